"""Options shared by several commands."""

from __future__ import annotations

import click

root_option = click.option(
    "--root",
    type=click.Path(file_okay=False),
    default=None,
    help="Data root (torchvision layout <root>/MNIST/raw). Default: $MNISTLAB_DATA, else ./data.",
)

mirror_option = click.option(
    "--mirror",
    "mirrors",
    multiple=True,
    metavar="URL",
    help="Download mirror (repeatable). Default: $MNISTLAB_MIRRORS, else the public mirrors.",
)

json_option = click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
