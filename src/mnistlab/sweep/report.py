"""What a sweep found: `sweep status` (a table), `sweep report` (one self-contained HTML page,
like a run's) and `sweep best` (the winning TrainConfig as a file for `train --config`).

The test set is touched once, here, for the best trial: its test accuracy is measured when a
report first shows that trial and kept in the study (attribute "test_evaluations"), so the
number is never measured again and every use of the test set is on record.
"""

from __future__ import annotations

import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import runs
from ..errors import MnistlabError
from .study import ATTR, Sweep, is_retry, is_surplus, quiet_optuna, retried_numbers, tally
from .worker import trial_name

TEST_ATTR = "test_evaluations"


def _state(trial: Any) -> str:
    return trial.state.name.lower()


def _note(trial: Any, again: set[int], retries: dict[int, int]) -> str:
    """Why a trial is where it is: pruned, failed and retried, continued from, not run."""
    notes = []
    if is_retry(trial):
        notes.append(f"retry of trial {trial.system_attrs['retry_history'][-1]}")
    if "continues" in trial.user_attrs:
        notes.append(f"continued trial {trial.user_attrs['continues']}'s epochs")
    if is_surplus(trial):
        notes.append("not run: the study was full")
    elif "error" in trial.user_attrs:
        notes.append(f"error: {trial.user_attrs['error']}")
    elif trial.state.name == "FAIL" and trial.number in again:
        notes.append(f"its worker stopped; retried as trial {retries.get(trial.number, '?')}")
    elif trial.state.name == "FAIL":
        notes.append("its worker stopped")
    if "stop_reason" in trial.user_attrs:
        notes.append(trial.user_attrs["stop_reason"])
    return "; ".join(notes)


def trial_rows(sweep: Sweep) -> list[dict[str, Any]]:
    """One row per trial: number, state, value, epochs, seconds, params, note, run folder."""
    trials = sweep.study.get_trials(deepcopy=False)
    again = retried_numbers(trials)
    retries = {t.system_attrs["retry_history"][-1]: t.number for t in trials if is_retry(t)}
    rows = []
    for t in trials:
        run = sweep.folder / trial_name(t.number)
        epochs = t.user_attrs.get("epoch") or (max(t.intermediate_values) if t.intermediate_values
                                               else None)  # fmt: skip
        rows.append({
            "number": t.number, "state": _state(t), "value": t.value, "epochs": epochs,
            "val_loss": t.user_attrs.get("val_loss"), "seconds": t.user_attrs.get("train_seconds"),
            "params": {p.key: t.params.get(p.key) for p in sweep.space.search},
            "note": _note(t, again, retries),
            "run": str(run) if run.is_dir() else None,
            "report": str(run / "report.html") if (run / "report.html").is_file() else None,
            "worker": t.user_attrs.get("worker"),
        })  # fmt: skip
    return rows


def _show(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def best_trial(sweep: Sweep) -> Any | None:
    with quiet_optuna():
        try:
            return sweep.study.best_trial
        except ValueError:  # no complete trial yet
            return None


def format_status(sweep: Sweep) -> str:
    """The status table as text: a header, the best trial, then one line per trial."""
    from .study import shown_url

    counts = tally(sweep.study)
    s = sweep.settings
    lines = [
        f"sweep {sweep.name}: {counts.line()}; budget {s.trials} "
        f"({'done' if counts.done(s.trials) else 'not done'})",
        f"  recipe {s.recipe}, sampler {s.sampler}, pruner {s.pruner}; storage "
        f"{shown_url(sweep.url)}",
        f"  space: {sweep.space.describe()}",
    ]
    best = best_trial(sweep)
    if best is not None:
        lines.append(f"  best: trial {best.number}, val acc {best.value:.2f}% "
                     f"({' '.join(f'{k}={_show(v)}' for k, v in best.params.items())})")
    rows = trial_rows(sweep)
    if not rows:
        return "\n".join([*lines, "  no trials yet"])
    keys = [p.key for p in sweep.space.search]
    header = ["trial", "state", "val acc", "epochs", "train s",
              *(k.removeprefix("model_args.") for k in keys), "note"]  # fmt: skip
    table = [header]
    for r in rows:
        table.append([
            str(r["number"]), r["state"], f"{r['value']:.2f}%" if r["value"] is not None else "–",
            _show(r["epochs"]), _fmt(r["seconds"], "{:.1f}"),
            *(_show(r["params"][k]) for k in keys), r["note"],
        ])  # fmt: skip
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    right = {0, 2, 3, 4}
    lines.append("")
    for row in table:
        lines.append("  ".join(v.rjust(widths[i]) if i in right else v.ljust(widths[i])
                               for i, v in enumerate(row)).rstrip())  # fmt: skip
    return "\n".join(lines)


def _fmt(value: Any, spec: str) -> str:
    return spec.format(value) if isinstance(value, int | float) else "–"


# --- sweep best --------------------------------------------------------------------------------


def best_config(sweep: Sweep) -> dict[str, Any]:
    """The winning trial's TrainConfig, test set back on (`train --config` trains the model)."""
    best = best_trial(sweep)
    if best is None:
        raise MnistlabError(f"sweep {sweep.name} has no complete trial yet")
    run = sweep.folder / trial_name(best.number)
    if (run / runs.CONFIG).is_file():
        config = runs.read_json(run / runs.CONFIG)
    else:  # the trial ran on another machine: rebuild its config from its parameters
        config = sweep.space.config(sweep.settings.recipe, best.params).to_dict()
    return {**config, "eval_test": True}


def write_best(sweep: Sweep, out: str | os.PathLike[str], force: bool = False) -> Path:
    from ..fileio import atomic_write_json

    path = Path(out)
    if path.suffix != ".json":
        raise MnistlabError(f"--config {path}: give a .json file (train --config reads it)")
    if path.exists() and not force:
        raise MnistlabError(f"{path} exists; pass --force to replace it")
    if path.is_dir():
        raise MnistlabError(f"--config {path} is a folder; give a file's path")
    config = best_config(sweep)
    try:
        atomic_write_json(path, config)
    except OSError as e:
        raise MnistlabError(f"cannot write {path}: {e.strerror or e}") from None
    return path


# --- the test set, once ---------------------------------------------------------------------------


def test_accuracy(sweep: Sweep, trial: Any, root: str | None = None) -> dict[str, Any] | None:
    """The best trial's test accuracy: measured the first time (its final weights on the 10,000
    test images) and kept in the study; read back after that."""
    attrs = sweep.study.user_attrs
    for record in attrs.get(TEST_ATTR, []):
        if record.get("trial") == trial.number:
            return record
    run = sweep.folder / trial_name(trial.number)
    if not (run / "model.pt").is_file():
        return None  # ran on another machine: its weights are there
    from ..checkpoints import load_model
    from ..data import BatchLoader, load_mnist
    from ..training import evaluate

    model, _ = load_model(run)
    images, labels = load_mnist(root, "test")
    loss, acc = evaluate(model, BatchLoader(images, labels, 1000))
    record = {"trial": trial.number, "test_acc": acc, "test_loss": loss,
              "val_acc": trial.value, "at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}  # fmt: skip
    sweep.study.set_user_attr(TEST_ATTR, [*attrs.get(TEST_ATTR, []), record])
    return record


# --- the HTML report ---------------------------------------------------------------------------


@dataclass
class SweepReport:
    path: Path
    figure_dir: Path
    figures: list[Path]
    best: int | None
    test_acc: float | None


def _figures(sweep: Sweep, best: Any | None) -> tuple[list[Any], list[str]]:
    """The report's figures, and a note for each that could not be drawn yet."""
    import matplotlib
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ovm

    from .. import plots
    from ..report import ReportFigure

    figures, notes = [], []
    target = "validation accuracy (%)"

    def optuna_figure(key: str, title: str, caption: str, draw: Any) -> None:
        try:
            # rc_context: Optuna's plots switch matplotlib to its ggplot style for good
            with quiet_optuna(), matplotlib.rc_context(), warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # e.g. equal importances, flat axes
                ax = draw()
                fig = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
                fig.set_size_inches(10, 4.5)
                png = plots.figure_png(fig)
            figures.append(ReportFigure(key, title, caption, png))
        except (ValueError, RuntimeError, ZeroDivisionError, IndexError) as e:
            plt.close("all")
            notes.append(f"{title}: not drawn yet ({str(e).splitlines()[0][:160]})")

    study = sweep.study
    optuna_figure("history", "Optimization history",
                  "Each complete trial's validation accuracy, and the best so far.",
                  lambda: ovm.plot_optimization_history(study, target_name=target))
    optuna_figure("importances", "Parameter importances",
                  "How much of the variation in validation accuracy each parameter explains "
                  "(fANOVA over the complete trials).",
                  lambda: ovm.plot_param_importances(study, target_name=target))
    optuna_figure("parallel", "Parallel coordinates",
                  "Each complete trial's parameters, coloured by its validation accuracy.",
                  lambda: ovm.plot_parallel_coordinate(study, target_name=target))
    figures.append(ReportFigure(
        "intermediate", "Validation accuracy per epoch",
        "Every trial's validation accuracy after each epoch: complete trials solid, pruned "
        "trials dashed in red (they stopped where their line ends).",
        plots.figure_png(intermediate_figure(study))))
    if best is not None:
        run = sweep.folder / trial_name(best.number)
        history = runs.read_metrics(run) if run.is_dir() else []
        if history:
            figures.append(ReportFigure(
                "best_curves", f"Trial {best.number}'s curves",
                "The best trial's training and validation loss and accuracy per epoch.",
                plots.figure_png(plots.plot_metrics(history))))
    return figures, notes


def intermediate_figure(study: Any) -> Any:
    """Validation accuracy per epoch of every trial, pruned trials marked."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 4.5))
    shown = set()
    for t in study.get_trials(deepcopy=False):
        if not t.intermediate_values:
            continue
        steps = sorted(t.intermediate_values)
        values = [t.intermediate_values[s] for s in steps]
        kind = t.state.name.lower()
        style = {"pruned": ("--", "#b3261e"), "complete": ("-", "#2f5fb3")}.get(
            kind, (":", "#888888"))  # fmt: skip
        ax.plot(steps, values, style[0], marker="o", markersize=3, color=style[1], alpha=0.7,
                label=kind if kind not in shown else None)  # fmt: skip
        shown.add(kind)
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation accuracy (%)")
    ax.set_title("Validation accuracy per epoch")
    ax.xaxis.get_major_locator().set_params(integer=True)
    if shown:
        ax.legend()
    ax.grid(alpha=0.3)
    return fig


def build_sweep_report(
    sweep: Sweep, out: str | os.PathLike[str] | None = None, *, root: str | None = None
) -> SweepReport:
    """Write the sweep's page (default runs/<sweep>/report.html, PNGs in report/ beside it)."""
    from ..fileio import atomic_write_bytes, atomic_write_text
    from ..report import _render, figure_dir_for
    from .study import shown_url

    out_path = Path(out) if out is not None else sweep.folder / "report.html"
    if out_path.is_dir():
        raise MnistlabError(f"--out {out_path} is a folder; give the HTML file's path")
    fig_dir = figure_dir_for(out_path)
    best = best_trial(sweep)
    figures, notes = _figures(sweep, best)
    test = test_accuracy(sweep, best, root) if best is not None else None
    rows = trial_rows(sweep)
    for r in rows:
        if r["report"]:
            r["report"] = os.path.relpath(r["report"], out_path.parent)
    counts = tally(sweep.study)
    attrs = sweep.study.user_attrs.get(ATTR, {})
    try:
        fig_dir.mkdir(parents=True, exist_ok=True)
        written = []
        for fig in figures:
            target = fig_dir / f"{fig.key}.png"
            atomic_write_bytes(target, fig.png)
            written.append(target)
        html = _render(
            "sweep.html", title=f"mnistlab sweep: {sweep.name}", sweep=sweep,
            settings=sweep.settings, counts=counts, done=counts.done(sweep.settings.trials),
            storage=shown_url(sweep.url), space_text=sweep.space.text,
            space_path=attrs.get("space_path", ""), best=best,
            best_params=[(k.removeprefix("model_args."), _show(v))
                         for k, v in (best.params.items() if best else [])],
            test=test, tests=sweep.study.user_attrs.get(TEST_ATTR, []),
            keys=[p.key.removeprefix("model_args.") for p in sweep.space.search],
            search_keys=[p.key for p in sweep.space.search], rows=rows, figures=figures,
            notes=notes, show=_show, figure_dir=os.path.relpath(fig_dir, out_path.parent),
        )  # fmt: skip
        atomic_write_text(out_path, html)
    except OSError as e:
        raise MnistlabError(f"cannot write the report to {out_path}: {e.strerror or e}") from None
    return SweepReport(out_path, fig_dir, written, best.number if best else None,
                       test["test_acc"] if test else None)


def status_json(sweep: Sweep) -> dict[str, Any]:
    counts = tally(sweep.study)
    best = best_trial(sweep)
    return {
        "name": sweep.name, "settings": sweep.settings.__dict__, "counts": counts.__dict__,
        "done": counts.done(sweep.settings.trials),
        "best": {"trial": best.number, "val_acc": best.value, "params": best.params}
        if best else None,
        "trials": [{k: v for k, v in r.items() if k != "report"} for r in trial_rows(sweep)],
    }  # fmt: skip
