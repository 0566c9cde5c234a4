"""`mnistlab models`: the model registry and the training recipes."""

from __future__ import annotations

import json

import click

from .options import json_option


@click.command()
@json_option
@click.option("--default", "default", is_flag=True, help="Show the bundled model's card.")
def models(as_json: bool, default: bool) -> None:
    """List models (name, class, parameters, description) and recipes."""
    if default:
        show_default_card(as_json)
        return
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


def show_default_card(as_json: bool) -> None:
    """The model card of the weights that ship with mnistlab."""
    from ..errors import MnistlabError
    from ..predict import bundled_weights, read_card

    weights = bundled_weights()
    card = read_card(weights)
    if card is None or not weights.is_file():
        raise MnistlabError(f"the bundled model or its card is missing beside {weights}")
    if as_json:
        click.echo(json.dumps({**card, "path": str(weights)}))
        return
    env = card.get("trained_on") or {}
    lines = [
        ("model", f"{card['model']} ({card['architecture']}, {card['parameters']:,} parameters)"),
        ("weights", f"{weights} ({card['dtype']}, sha256 {card['sha256'][:16]}…)"),
        (
            "test accuracy",
            f"{card['test_accuracy']:.2f}% on the {card['test_images']:,} MNIST test images, "
            "measured on this file",
        ),
        ("validation", f"{card['val_accuracy']:.2f}%" if "val_accuracy" in card else None),
        ("trained with", card.get("train_command")),
        (
            "trained on",
            f"{env.get('processor')}, {env.get('threads')} threads, torch {env.get('torch')}, "
            f"{card.get('train_seconds', 0) / 60:.0f} min"
            if env
            else None,
        ),
        ("trained", card.get("trained")),
        ("date", card.get("date")),
    ]
    click.echo("bundled model (used by `mnistlab predict` when --model is not given)")
    for key, value in lines:
        if value:
            click.echo(f"  {key + ':':<15}{value}")
