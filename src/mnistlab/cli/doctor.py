"""`mnistlab doctor`: the machine, torch, the decisions auto makes, the data and the model."""

from __future__ import annotations

import json

import click

from .options import json_option, root_option


@click.command()
@root_option
@json_option
def doctor(root: str | None, as_json: bool) -> None:
    """What mnistlab sees here: paste it into a bug report.

    The hardware and torch build, what precision, layout and threads `auto` picks for each
    recipe and why, whether the data root's files verify, and the bundled model with the
    inference engine it runs on.
    """
    from ..doctor import format_report, report

    r = report(root)
    click.echo(json.dumps(r) if as_json else format_report(r))
