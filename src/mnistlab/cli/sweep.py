"""`mnistlab sweep`: hyperparameter sweeps on Optuna, each trial a normal run folder.

    mnistlab sweep NAME --space SPACE.toml [options]   run a sweep, or continue it (= sweep run)
    mnistlab sweep status NAME                         its trials as a table
    mnistlab sweep report NAME                         one HTML page: figures, trials, the winner
    mnistlab sweep best NAME --config best.json        the winning config, for train --config

NAME may be anything but the subcommands' names (run, status, report, best); `sweep run NAME`
takes any name.
"""

from __future__ import annotations

import json
import os
import sys

import click

from .options import json_option, root_option

SUBCOMMANDS = ("run", "status", "report", "best")


class SweepGroup(click.Group):
    """`sweep NAME ...` means `sweep run NAME ...`; `sweep status NAME` etc. are subcommands."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and not args[0].startswith("-"):
            args = ["run", *args]
        return super().parse_args(ctx, args)

    def format_usage(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        formatter.write_usage(ctx.command_path, "NAME --space SPACE.toml [OPTIONS]")
        formatter.write_usage(ctx.command_path, "status|report|best NAME [OPTIONS]",
                              prefix="   or: ")


runs_dir_option = click.option("--runs-dir", default="runs", show_default=True,
                               help="Parent folder of sweeps (a sweep is runs/NAME/).")
storage_option = click.option(
    "--storage", default=None, metavar="URL",
    help="Study database: any URL Optuna takes (postgresql://user@host/db, mysql+pymysql://...). "
    "Default: the one the sweep was made with, else sqlite:///runs/NAME/study.db.",
)


@click.group(cls=SweepGroup, no_args_is_help=True)
def sweep() -> None:
    """Search hyperparameters with Optuna; each trial is a normal run under runs/NAME/.

    `mnistlab sweep NAME --space SPACE.toml` runs sweep NAME (the same command again continues
    it); `sweep status|report|best NAME` look at it. Trials choose on the validation split
    (the lab's 50,000 / 10,000 unless the space says otherwise); the test set is used once, for
    the best trial, in the report. Two spaces ship with mnistlab: lab-mlp and fast.
    """


@sweep.command("run")
@click.argument("name")
@click.option("--space", "space_file", default=None, metavar="SPACE.toml",
              help="Search space file (or a bundled one: lab-mlp, fast). Needed for a new sweep.")
@click.option("--recipe", default=None, help="Recipe under the space's fixed keys. Default: the "
              "space's [sweep] recipe, else lab.")
@click.option("--trials", type=int, default=None,
              help="Trials in the study, all workers together. Default: the space's, else 20.")
@click.option("--timeout", type=float, default=None, metavar="SECONDS",
              help="Start no trial after this many seconds (running ones finish).")
@click.option("--workers", type=int, default=1, show_default=True,
              help="Worker processes on this machine, sharing the study.")
@storage_option
@click.option("--sampler", type=click.Choice(["tpe", "random", "grid"]), default=None,
              help="Default: the space's, else tpe.")
@click.option("--pruner", type=click.Choice(["median", "hyperband", "none"]), default=None,
              help="Stops unpromising trials after an epoch. Default: the space's, else median.")
@click.option("--heartbeat", type=int, default=None, metavar="SECONDS",
              help="Seconds between a worker's heartbeats; a trial silent for 3 beats is failed "
              "and retried. Default: 10.")
@click.option("--no-trial-reports", is_flag=True, help="Skip each trial's report.html.")
@click.option("--worker-id", type=int, default=None, hidden=True)
@runs_dir_option
@root_option
def run(name, space_file, recipe, trials, timeout, workers, storage, sampler, pruner, heartbeat,
        no_trial_reports, worker_id, runs_dir, root) -> None:
    """Run sweep NAME, or continue it: trials until the study has --trials of them."""
    from ..errors import Interrupted, MnistlabError

    if workers < 1:
        raise MnistlabError(f"--workers must be at least 1, got {workers}")
    if timeout is not None and not timeout > 0:
        raise MnistlabError(f"--timeout must be a positive number of seconds, got {timeout}")
    if heartbeat is not None and heartbeat < 1:
        raise MnistlabError(f"--heartbeat must be at least 1 second, got {heartbeat}")
    if trials is not None and trials < 1:
        raise MnistlabError(f"--trials must be at least 1, got {trials}")
    from ..sweep import open_sweep, read_space, tally, work
    from ..sweep.study import HEARTBEAT, shown_url
    from ..sweep.worker import WORKER_ENV, run_workers

    prefix = f"[w{worker_id}] " if worker_id is not None else ""

    def log(line: str) -> None:
        click.echo(prefix + line)

    space = read_space(space_file) if space_file is not None else None
    flags = {k: v for k, v in (("recipe", recipe), ("trials", trials), ("sampler", sampler),
                               ("pruner", pruner)) if v is not None}  # fmt: skip
    if worker_id is not None:
        storage = storage or os.environ.get(WORKER_ENV)
    sw = open_sweep(name, runs_dir=runs_dir, space=space, flags=flags, storage=storage,
                    heartbeat=heartbeat or HEARTBEAT, create=worker_id is None)  # fmt: skip
    if worker_id is None:
        counts = tally(sw.study)
        log(f"sweep {name}: {sw.space.describe()}")
        log(f"  {sw.settings.trials} trials ({counts.fresh} started before), recipe "
            f"{sw.settings.recipe}, sampler {sw.settings.sampler}, pruner {sw.settings.pruner}; "
            f"storage {shown_url(sw.url)}; runs in {sw.folder}/")
    notes: list[str] = []
    if workers == 1:
        try:
            work(sw, root=root, log=log, timeout=timeout, seed_offset=worker_id or 0,
                 reports=not no_trial_reports)
        except Interrupted:
            if worker_id is None:
                raise
            sys.exit(130)  # a worker of `--workers K`: the launcher says it in one line
    else:
        args = ["--runs-dir", runs_dir, "--heartbeat", str(sw.heartbeat)]
        for option, value in (("--timeout", timeout), ("--root", root)):
            if value is not None:
                args += [option, str(value)]
        if no_trial_reports:
            args.append("--no-trial-reports")
        notes = run_workers(sw, workers, args, log=log)
    if worker_id is not None:
        return
    _finish(sw, notes, timeout)


def _finish(sw, notes: list[str], timeout: float | None) -> None:
    from ..errors import MnistlabError
    from ..sweep import tally
    from ..sweep.report import best_trial

    counts = tally(sw.study)
    best = best_trial(sw)
    line = f"sweep {sw.name}: {counts.line()}"
    if best is not None:
        line += f"; best trial {best.number}: val acc {best.value:.2f}%"
    if counts.done(sw.settings.trials):
        click.echo(line)
        click.echo(f"see: mnistlab sweep report {sw.name}")
        return
    if timeout is not None and not notes:
        click.echo(line + f" (stopped after --timeout {timeout:g}; rerun to continue)")
        return
    raise MnistlabError(line + "; " + "; ".join(notes or ["the workers stopped early"]) +
                        f"; rerun `mnistlab sweep {sw.name}` to continue")


@sweep.command()
@click.argument("name")
@runs_dir_option
@storage_option
@json_option
def status(name: str, runs_dir: str, storage: str | None, as_json: bool) -> None:
    """Sweep NAME's trials: state, validation accuracy, epochs, time, parameters, notes."""
    from ..sweep import open_sweep
    from ..sweep.report import format_status, status_json

    sw = open_sweep(name, runs_dir=runs_dir, storage=storage)
    click.echo(json.dumps(status_json(sw)) if as_json else format_status(sw))


@sweep.command()
@click.argument("name")
@click.option("--out", type=click.Path(dir_okay=False), default=None,
              help="HTML file to write. Default: runs/NAME/report.html (PNGs in report/).")
@runs_dir_option
@storage_option
@root_option
def report(name: str, out: str | None, runs_dir: str, storage: str | None,
           root: str | None) -> None:
    """One self-contained HTML page of sweep NAME; the best trial's test accuracy, once."""
    from ..sweep import open_sweep
    from ..sweep.report import build_sweep_report

    sw = open_sweep(name, runs_dir=runs_dir, storage=storage)
    result = build_sweep_report(sw, out, root=root)
    click.echo(f"wrote {result.path}")
    click.echo(f"figures: {result.figure_dir}/ ({len(result.figures)} PNG files)")
    if result.test_acc is not None:
        click.echo(f"best trial {result.best}: test accuracy {result.test_acc:.2f}% "
                   "(the sweep's one use of the test set)")


@sweep.command()
@click.argument("name")
@click.option("--config", "out", required=True, metavar="FILE.json",
              help="Where to write the best trial's TrainConfig (for `mnistlab train --config`).")
@click.option("--force", is_flag=True, help="Replace FILE if it exists.")
@runs_dir_option
@storage_option
def best(name: str, out: str, force: bool, runs_dir: str, storage: str | None) -> None:
    """Write the best trial's config; train it with `mnistlab train --config FILE`."""
    from ..sweep import open_sweep
    from ..sweep.report import best_trial, write_best

    sw = open_sweep(name, runs_dir=runs_dir, storage=storage)
    path = write_best(sw, out, force=force)
    trial = best_trial(sw)
    click.echo(f"wrote {path}: trial {trial.number}'s config (val acc {trial.value:.2f}%)")
    click.echo(f"train it: mnistlab train --config {path}")
