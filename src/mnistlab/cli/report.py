"""`mnistlab report`, `mnistlab runs` and `mnistlab compare`: look at what runs learned."""

from __future__ import annotations

import json

import click

from .options import json_option, root_option

runs_dir_option = click.option(
    "--runs-dir", default="runs", show_default=True, help="Parent folder of runs."
)


@click.command()
@click.argument("run")
@click.option(
    "--out",
    type=click.Path(dir_okay=False),
    default=None,
    help="HTML file to write; its PNGs go in a folder of the same name. "
    "Default: <run>/report.html and <run>/report/.",
)
@click.option(
    "--inside",
    is_flag=True,
    help="Also look inside the model: first layer, feature maps, integrated gradients, the "
    "t-SNE embedding map, and what test-time augmentation changes (seconds more).",
)
@runs_dir_option
@root_option
def report(run: str, out: str | None, inside: bool, runs_dir: str, root: str | None) -> None:
    """One self-contained HTML page of a run: curves, metrics, confusion matrix, mistakes."""
    from ..report import build_report

    result = build_report(
        run, out, runs_dir=runs_dir, root=root, log=lambda line: click.echo(line, err=True),
        inside=inside,
    )
    state = "" if result.complete else " (INCOMPLETE run: the report shows what exists)"
    click.echo(f"wrote {result.path}{state}")
    click.echo(f"figures: {result.figure_dir}/ ({len(result.figures)} PNG files)")


@click.command()
@runs_dir_option
@json_option
def runs(runs_dir: str, as_json: bool) -> None:
    """The runs in --runs-dir, newest first: model, recipe, epochs, accuracies, time, date."""
    from ..report import format_runs, list_runs

    rows = list_runs(runs_dir)
    if as_json:
        click.echo(json.dumps(rows))
    elif not rows:
        click.echo(f"no runs in {runs_dir}")
    else:
        click.echo(format_runs(rows))


@click.command()
@click.argument("run_names", metavar="RUN RUN...", nargs=-1, required=True)
@click.option(
    "--out",
    type=click.Path(dir_okay=False),
    default="compare.html",
    show_default=True,
    help="HTML file to write; the curves PNG goes in a folder of the same name.",
)
@runs_dir_option
def compare(run_names: tuple[str, ...], out: str, runs_dir: str) -> None:
    """Several runs side by side: curves overlaid and final metrics in one HTML table."""
    from ..report import build_comparison

    result = build_comparison(run_names, out, runs_dir=runs_dir)
    click.echo(f"wrote {result.path}")
