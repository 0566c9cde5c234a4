"""`mnistlab models`: the model registry and the training recipes."""

from __future__ import annotations

import json

import click

from .options import json_option


@click.command()
@json_option
def models(as_json: bool) -> None:
    """List models (name, class, parameters, description) and recipes."""
    from ..config import RECIPES
    from ..models import MODELS, count_parameters

    rows = [
        {
            "name": e.name,
            "class": e.cls.__name__,
            "parameters": count_parameters(e.cls()),
            "description": e.description,
        }
        for e in MODELS.values()
    ]
    recipes = [
        {"name": r.name, "description": r.description, **r.overrides} for r in RECIPES.values()
    ]
    if as_json:
        click.echo(json.dumps({"models": rows, "recipes": recipes}))
        return
    click.echo(f"{'name':<12} {'class':<22} {'parameters':>10}  description")
    for r in rows:
        click.echo(f"{r['name']:<12} {r['class']:<22} {r['parameters']:>10,}  {r['description']}")
    click.echo("\nrecipes (mnistlab train --recipe NAME):")
    for r in RECIPES.values():
        click.echo(f"  {r.name:<10} {r.description}")
