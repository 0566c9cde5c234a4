"""The `mnistlab` command: a thin layer over the library.

Subcommands are imported only when they run, so `mnistlab --help` and `--version` never pay for
torch or matplotlib. Errors a user can cause (MnistlabError) become one line and exit status 1.
"""

from __future__ import annotations

import importlib
import sys

import click

from .. import __version__
from ..errors import MnistlabError

# name -> "module:attribute" under mnistlab.cli; adding a command is one line here.
COMMANDS = {
    "data": "data:data",
    "train": "train:train",
    "evaluate": "evaluate:evaluate",
    "models": "models:models",
    "predict": "predict:predict",
    "export": "export:export",
    "serve": "serve:serve",
    "report": "report:report",
    "runs": "report:runs",
    "compare": "report:compare",
    "sweep": "sweep:sweep",
    "lr-find": "lrfind:lr_find",
    "doctor": "doctor:doctor",
}


class LazyGroup(click.Group):
    """A click group whose subcommands are imported on first use."""

    def __init__(self, *args, lazy: dict[str, str] | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.lazy = lazy or {}

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | set(self.lazy))

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in self.lazy:
            module, attr = self.lazy[name].split(":")
            return getattr(importlib.import_module(f"{__name__}.{module}"), attr)
        return super().get_command(ctx, name)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        # Listing short help would import every command; show names and a fixed blurb instead.
        rows = [(name, HELP.get(name, "")) for name in self.list_commands(ctx)]
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


HELP = {
    "data": "Download, verify and inspect MNIST.",
    "train": "Train a model into a run folder (the lab's recipe by default).",
    "evaluate": "Accuracy, per-class report and confusion matrix of a run or weights file.",
    "models": "List the registered models and training recipes.",
    "predict": "Read the digit in image files (PNG, JPEG, ...), folders or stdin.",
    "export": "Export a run or weights to ONNX (verified) or safetensors with a model card.",
    "serve": "A web page to draw a digit and see it read, and a JSON API.",
    "report": "One self-contained HTML report of a run: curves, metrics, figures.",
    "runs": "Table of runs, newest first.",
    "compare": "Several runs side by side: curves overlaid, final metrics in one table.",
    "sweep": "Hyperparameter sweeps on Optuna (SQLite or a database), each trial a run.",
    "lr-find": "The learning-rate range test: plot and a suggested learning rate.",
    "doctor": "The hardware, torch, what auto decides and why, the data and the bundled model.",
}


@click.group(cls=LazyGroup, lazy=COMMANDS, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "-V", "--version", prog_name="mnistlab")
def cli() -> None:
    """mnistlab: handwritten-digit classification with PyTorch, end to end."""


def fail(message: str, code: int = 1) -> None:
    from .. import distributed

    if distributed.launched():  # `train --nproc` prints the one line for all its processes
        distributed.note(error=message)
    else:
        click.echo(f"mnistlab: error: {message}", err=True)
    sys.exit(code)


def error_message(e: click.ClickException) -> str:
    """The one line (after `mnistlab: error: `) that the command line prints for `e`."""
    text = e.format_message().replace("\n", " ")
    if isinstance(e, click.UsageError) and e.ctx is not None:
        text += f" (see `{e.ctx.command_path} --help`)"
    return text


def main(argv: list[str] | None = None) -> None:
    try:
        args = list(argv) if argv is not None else sys.argv[1:]
        # obj["argv"]: the command line as given, for commands that relaunch themselves
        # (`train --nproc`, `sweep --workers`).
        rc = cli.main(args=args, prog_name="mnistlab", standalone_mode=False,
                      obj={"argv": args})
        sys.exit(rc if isinstance(rc, int) else 0)
    except MnistlabError as e:
        fail(str(e))
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except click.ClickException as e:
        fail(error_message(e), e.exit_code)
    except click.exceptions.Abort:
        fail("aborted", 130)
    except KeyboardInterrupt:
        fail("interrupted", 130)
    except BrokenPipeError:
        sys.exit(1)
