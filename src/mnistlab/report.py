"""What a run learned, as a page: the run report, the runs table and the comparison of runs.

A report is one self-contained HTML file (figures embedded as data URIs, inline CSS, no scripts,
nothing fetched) with each figure also written as a PNG in a folder beside it:
`runs/<name>/report.html` and `runs/<name>/report/*.png` by default.
"""

from __future__ import annotations

import base64
import functools
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from . import runs
from .errors import MnistlabError
from .fileio import atomic_write_bytes, atomic_write_text

WEIGHTS = "model.pt"
CHECKPOINT = "checkpoint.pt"
TEMPLATE_DIR = Path(__file__).with_name("templates")
FIGURES = ("curves", "per_class", "confusion_matrix", "predictions", "misclassified", "calibration")
# `--inside` adds these (mnistlab.inside, mnistlab.tta): they cost seconds, so they are asked for.
INSIDE_FIGURES = ("first_layer", "feature_maps", "saliency", "embedding")
EMBEDDING_JSON = "embedding.json"  # the map's points, beside the figures, for the page


@dataclass
class RunRecord:
    """Everything a run folder holds that a report shows, read and checked."""

    path: Path
    config: dict[str, Any]
    history: list[dict[str, Any]]
    environment: dict[str, Any] | None
    summary: dict[str, Any] | None
    notes: list[str] = field(default_factory=list)  # what is missing or odd, for the reader

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def complete(self) -> bool:
        return self.summary is not None

    @property
    def last(self) -> dict[str, Any]:
        return self.history[-1]

    @property
    def test_acc(self) -> float | None:
        """The run's own test accuracy: summary.json's, else the last epoch's."""
        source = self.summary if self.complete else self.last
        value = (source or {}).get("test_acc")
        return float(value) if isinstance(value, int | float) else None

    @property
    def test_loss(self) -> float | None:
        source = self.summary if self.complete else self.last
        value = (source or {}).get("test_loss")
        return float(value) if isinstance(value, int | float) else None

    @property
    def best_val_acc(self) -> float | None:
        values = [r["val_acc"] for r in self.history if isinstance(r.get("val_acc"), int | float)]
        return max(values) if values else None

    @property
    def train_seconds(self) -> float:
        if self.summary and isinstance(self.summary.get("train_seconds"), int | float):
            return float(self.summary["train_seconds"])
        return float(sum(r.get("seconds", 0.0) or 0.0 for r in self.history))

    @property
    def started(self) -> datetime:
        """When the run began (environment.json), else when its config was written."""
        text = (self.environment or {}).get("started")
        if isinstance(text, str):
            try:
                return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S%z")
            except ValueError:
                pass
        return datetime.fromtimestamp((self.path / runs.CONFIG).stat().st_mtime).astimezone()

    @property
    def status(self) -> str:
        return "complete" if self.complete else "incomplete"


def read_run(run: str | os.PathLike[str], runs_dir: str | os.PathLike[str] = runs.RUNS_DIR,
             ) -> RunRecord:
    """Read a run folder (a path, or a name under `runs_dir`); one clear error if it cannot
    be reported on: missing, not a run, unreadable metrics, or no complete epoch yet."""
    path = runs.find_run(run, runs_dir)
    if not (path / runs.CONFIG).is_file():
        raise MnistlabError(f"{path} is not a run folder (it has no {runs.CONFIG})")
    config = runs.read_json(path / runs.CONFIG)
    if not isinstance(config, dict):
        raise MnistlabError(f"{path / runs.CONFIG} is unreadable (not a JSON object)")
    history = runs.read_metrics(path)
    for n, record in enumerate(history, start=1):
        if not isinstance(record, dict) or not isinstance(record.get("epoch"), int):
            raise MnistlabError(
                f"{path / runs.METRICS} is unreadable at record {n}: not an epoch's metrics"
            )
    if not history:
        raise MnistlabError(
            f"run {path} has no complete epoch yet (training is still running, or it stopped "
            f"before its first epoch ended); wait for it, or resume it with "
            f"`mnistlab train --resume {path}`"
        )
    notes: list[str] = []
    environment = _optional_json(path / runs.ENVIRONMENT, notes)
    summary = _optional_json(path / runs.SUMMARY, notes)
    record = RunRecord(path, config, history, environment, summary, notes)
    if not record.complete:
        planned = config.get("epochs", "?")
        notes.insert(
            0,
            f"INCOMPLETE: no {runs.SUMMARY}; the run stopped (or is still running) after epoch "
            f"{record.last['epoch']} of {planned}. Numbers are those of its last complete epoch.",
        )
    return record


def _optional_json(path: Path, notes: list[str]) -> dict[str, Any] | None:
    if not path.exists():
        return None
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        notes.append(f"{path.name} is unreadable ({e}); it is left out")
        return None
    if not isinstance(value, dict):
        notes.append(f"{path.name} is not a JSON object; it is left out")
        return None
    return value


# --- the report ------------------------------------------------------------------------------


@dataclass
class ReportFigure:
    key: str
    title: str
    caption: str
    png: bytes

    @property
    def data_uri(self) -> str:
        return "data:image/png;base64," + base64.b64encode(self.png).decode("ascii")


@dataclass
class Report:
    path: Path
    figure_dir: Path
    figures: list[Path]
    complete: bool
    test_acc: float | None
    tta: dict[str, Any] | None = None


def _evaluation_images(config: dict[str, Any], root: str | os.PathLike[str] | None):
    """(images, labels, name) a report evaluates on: the test set, or for a run that kept it
    out (a sweep's trial, `eval_test` off) the run's own validation split."""
    from .data import load_mnist, split_indices

    if config.get("eval_test", True) is not False:
        return (*load_mnist(root, "test"), "test")
    images, labels = load_mnist(root, "train")
    limit = int(config.get("train_limit") or 0)
    if limit:
        images, labels = images[:limit], labels[:limit]
    val_split = float(config.get("val_split") or 0.0)
    if not val_split:
        raise MnistlabError("the run has neither a test set nor a validation split to report on")
    _, val_idx = split_indices(labels, val_split, seed=int(config.get("seed") or 0))
    return images[val_idx], labels[val_idx], "validation"


def default_report_path(run_dir: Path) -> Path:
    return run_dir / "report.html"


def figure_dir_for(out: Path) -> Path:
    """PNGs go in a folder named after the HTML file: report.html → report/."""
    return out.with_suffix("") if out.suffix else out.with_name(out.name + "_files")


def _load_weights(record: RunRecord):
    """(model, where the weights came from) or (None, why not): model.pt, else checkpoint.pt."""
    from . import checkpoints as ck
    from .models import create_model

    for name, what in ((WEIGHTS, "final weights"), (CHECKPOINT, "weights after the last epoch")):
        path = record.path / name
        if not path.is_file():
            continue
        try:
            state, _ = ck.read_weights(path)
            model = create_model(record.config.get("model", "mlp"),
                                 **(record.config.get("model_args") or {}))
            ck.load_state_into(model, state, str(path))
        except MnistlabError as e:
            record.notes.append(f"{name} cannot be used ({e}); figures that need the model are "
                                "left out")
            return None, None
        return model.eval(), f"{name} ({what})"
    record.notes.append(
        f"no weights yet (no {WEIGHTS} or {CHECKPOINT}); figures that need the model are left out"
    )
    return None, None


def build_report(
    run: str | os.PathLike[str],
    out: str | os.PathLike[str] | None = None,
    *,
    runs_dir: str | os.PathLike[str] = runs.RUNS_DIR,
    root: str | os.PathLike[str] | None = None,
    log: Callable[[str], None] | None = None,
    inside: bool = False,
    renderer: Any = None,
) -> Report:
    """Write the report of a run: HTML at `out` (default <run>/report.html), PNGs beside it.

    `inside` adds the views from inside the model (first layer, feature maps, integrated
    gradients, the t-SNE embedding map) and what test-time augmentation changes: seconds more.
    `renderer` draws the main figures (a `mnistlab.render.FigurePool` started ahead of time, or
    by default this process).
    """
    record = read_run(run, runs_dir)
    out_path = Path(out) if out is not None else default_report_path(record.path)
    if out_path.is_dir():
        raise MnistlabError(f"--out {out_path} is a folder; give the HTML file's path")
    fig_dir = figure_dir_for(out_path)

    from .render import FigureJob, LocalRenderer

    # (key, title, caption, job) of each figure; drawn together below.
    planned: list[tuple[str, str, str, FigureJob]] = [
        ("curves", "Training curves",
         "Loss and accuracy after each epoch, on the training set (the running figures of the "
         "epoch), the test set and, dashed, the validation split if the run held one out.",
         FigureJob("plot_metrics", (record.history,))),
    ]
    model, weights_from = _load_weights(record)
    evaluation: dict[str, Any] | None = None
    inside_figures: list[ReportFigure] = []
    tta: dict[str, Any] | None = None
    embedding: dict[str, Any] | None = None
    eval_set = "test"
    if model is not None:
        from .data import BatchLoader
        from .metrics import classification_metrics, expected_calibration_error
        from .models import count_parameters
        from .training import predict_logits

        images, labels, eval_set = _evaluation_images(record.config, root)
        batch = int(record.config.get("eval_batch_size") or 1000)
        logits, y = predict_logits(model, BatchLoader(images, labels, batch))
        probs = logits.softmax(1)
        evaluation = classification_metrics(logits, y)
        evaluation["ece"] = expected_calibration_error(probs, y)
        evaluation["parameters"] = count_parameters(model)
        seed = int(record.config.get("seed", 0) or 0)
        # Plain arrays: the figures may be drawn in processes without torch.
        images_np, y_np, probs_np = images.numpy(), y.numpy(), probs.numpy()
        planned += [
            ("per_class", "Precision, recall and F1 by digit",
             "How often a predicted digit is right (precision), how many of each digit are "
             "found (recall), and their harmonic mean (F1).",
             FigureJob("plot_per_class", (evaluation["per_class"],))),
            ("confusion_matrix", "Confusion matrix",
             "Rows are the true digit, columns the prediction; off the diagonal are the "
             "mistakes.",
             FigureJob("plot_confusion_matrix", (evaluation["confusion_matrix"],),
                       {"title": f"Confusion matrix ({evaluation['count']:,} {eval_set} images)"})),
            ("predictions", f"Predictions on random {eval_set} images",
             "Each title is predicted / true label; mistakes are red and framed.",
             FigureJob("display_predictions", (images_np, y_np, probs_np.argmax(1)),
                       {"n": 24, "seed": seed, "cols": 8})),
            ("misclassified", "Most confident mistakes",
             "The wrong predictions the model was surest of, with its three most probable "
             "digits.",
             FigureJob("plot_misclassified", (images_np, y_np, probs_np), {"n": 12})),
            ("calibration", "Calibration",
             "Accuracy against confidence per bin: a red tick above its bar means the model "
             "was over-confident there. ECE is the count-weighted mean gap.",
             FigureJob("plot_calibration", (probs_np, y_np))),
        ]
    pending = (renderer or LocalRenderer()).start([job for *_, job in planned])
    # While the figures are drawn elsewhere: the inside views, jinja2's import, the templates.
    if model is not None and inside:
        inside_figures, tta, embedding = _inside(model, images, y, logits, seed, log)
    _templates()
    from .models import MODELS

    figures = [
        ReportFigure(key, title, caption, png)
        for (key, title, caption, _), png in zip(planned, pending(), strict=True)
    ]

    try:
        fig_dir.mkdir(parents=True, exist_ok=True)
        written = []
        for fig in figures + inside_figures:
            target = fig_dir / f"{fig.key}.png"
            atomic_write_bytes(target, fig.png)
            written.append(target)
        made = {f.key for f in figures + inside_figures}
        for key in FIGURES + INSIDE_FIGURES:  # figures of an earlier report not made this time
            if key not in made:
                (fig_dir / f"{key}.png").unlink(missing_ok=True)
        if embedding is not None:
            atomic_write_text(fig_dir / EMBEDDING_JSON, json.dumps(embedding))
        else:
            (fig_dir / EMBEDDING_JSON).unlink(missing_ok=True)
        model_name = str(record.config.get("model", "?"))
        entry = MODELS.get(model_name)
        html = _render(
            "report.html",
            run=record,
            title=f"mnistlab report: {record.name}",
            figures=figures,
            inside_figures=inside_figures,
            tta=tta,
            evaluation=evaluation,
            eval_set=eval_set,
            weights_from=weights_from,
            extra_notes=record.notes[0 if record.complete else 1 :],
            model_class=entry.cls.__name__ if entry else model_name,
            planned_epochs=record.config.get("epochs"),
            config_rows=_rows(record.config),
            environment_rows=_environment_rows(record.environment or {}),
            epoch_columns=_epoch_columns(record.history),
            figure_dir=os.path.relpath(fig_dir, out_path.parent),
        )
        atomic_write_text(out_path, html)
    except OSError as e:
        raise MnistlabError(f"cannot write the report to {out_path}: {e.strerror or e}") from None
    if log is not None:
        for note in record.notes:
            log(f"note: {note}")
    return Report(out_path, fig_dir, written, record.complete, record.test_acc, tta)


def _inside(model, images, labels, logits, seed: int, log: Callable[[str], None] | None):
    """The `--inside` figures, what TTA changes, and the embedding map's points."""
    import torch

    from . import inside, plots, tta

    x = inside.as_images(images)
    figures = []
    layer = inside.first_layer(model)
    what = {"linear": "Each unit's 784 weights as a 28×28 image: the pattern of ink it "
                      "looks for (red) and against (blue).",
            "conv": "The first convolution's filters: each slides over the image and "
                    "answers where the ink matches its pattern."}[layer.kind]
    figures.append(ReportFigure("first_layer", "First layer", what, plots.figure_png(
        plots.plot_first_layer(layer.weights, layer.kind))))
    predicted = logits.argmax(1)
    if layer.kind == "conv":
        first = int(torch.nonzero(predicted == labels)[0]) if (predicted == labels).any() else 0
        figures.append(ReportFigure(
            "feature_maps", "Feature maps",
            f"What each first-layer filter answers to test digit {first} (brighter: stronger).",
            plots.figure_png(plots.plot_feature_maps(
                x[first], inside.feature_maps(model, x[first]), int(labels[first])))))
    rng = torch.Generator().manual_seed(seed)
    right = torch.nonzero(predicted == labels).squeeze(1)
    wrong = torch.nonzero(predicted != labels).squeeze(1)
    pick = torch.cat([right[torch.randperm(len(right), generator=rng)[:6]], wrong[:6]])
    explained = inside.integrated_gradients(model, x[pick])
    figures.append(ReportFigure(
        "saliency", "Why? Integrated gradients",
        "Which pixels raised the predicted digit's score (red) or lowered it (blue), from a "
        "black image to the digit: six random test digits, then the first mistakes.",
        plots.figure_png(plots.plot_saliency(x[pick], explained.attributions,
                                             labels[pick].tolist(), explained.labels.tolist()))))
    if log is not None:
        log("inside: t-SNE embedding map of 2,000 test digits (a few seconds)")
    emap = inside.embedding_map(model, x, labels, n=2000, seed=seed)
    figures.append(ReportFigure(
        "embedding", "Embedding map",
        "Each dot is a test digit placed by t-SNE so that digits the model sees as alike "
        "(on its penultimate layer) sit together; colour is the true digit, black rings are "
        "mistakes.",
        plots.figure_png(plots.plot_embedding(emap.xy, emap.labels, emap.predictions))))
    with torch.no_grad():
        probs = tta.tta_probabilities(lambda v: model(inside.normalize(v)), x, chunk=500)
    change = tta.compare(logits, probs, labels).to_dict()
    return figures, change, emap.to_dict()


def _rows(d: dict[str, Any]) -> list[tuple[str, str]]:
    return [(k, v if isinstance(v, str) else json.dumps(v)) for k, v in d.items()]


def _environment_rows(env: dict[str, Any]) -> list[tuple[str, str]]:
    """environment.json as rows; the hardware and the decisions made for it one row each."""
    rows = []
    for key, value in env.items():
        if key in ("hardware", "execution") and isinstance(value, dict):
            for sub, v in value.items():
                if isinstance(v, dict) and set(v) == {"value", "reason"}:
                    v = f"{json.dumps(v['value'])} ({v['reason']})"
                rows += _rows({f"{key}.{sub}": v})
        else:
            rows += _rows({key: value})
    return rows


EPOCH_COLUMNS = (
    ("epoch", "epoch", "{:d}"),
    ("train_loss", "train loss", "{:.4f}"),
    ("train_acc", "train acc", "{:.2f}%"),
    ("val_loss", "val loss", "{:.4f}"),
    ("val_acc", "val acc", "{:.2f}%"),
    ("test_loss", "test loss", "{:.4f}"),
    ("test_acc", "test acc", "{:.2f}%"),
    ("lr", "lr", "{:.3g}"),
    ("seconds", "seconds", "{:.1f}"),
)


def _epoch_columns(history: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
    return [c for c in EPOCH_COLUMNS if any(c[0] in r for r in history)]


def _fmt(value: Any, spec: str = "{:.2f}") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    try:
        return spec.format(value)
    except (ValueError, TypeError):
        return str(value)


def _pct(value: Any) -> str:
    return _fmt(value, "{:.2f}%")


# --- the runs table and the comparison -----------------------------------------------------


def list_runs(runs_dir: str | os.PathLike[str] = runs.RUNS_DIR) -> list[dict[str, Any]]:
    """One row per run folder under `runs_dir`, newest first; unreadable runs say why."""
    parent = Path(runs_dir)
    if not parent.is_dir():
        raise MnistlabError(f"no runs folder {parent}; train a run first, or pass --runs-dir")
    rows = []
    for path in sorted(parent.iterdir()):
        if not (path / runs.CONFIG).is_file():
            continue  # not a run (a report folder, a comparison, a stray file)
        try:
            record = read_run(path)
        except MnistlabError as e:
            rows.append(_broken_overview(path, e))
            continue
        rows.append(_overview(record))
    rows.sort(key=lambda r: (r["_sort"], r["name"]), reverse=True)
    for r in rows:
        del r["_sort"]
    return rows


def _overview(record: RunRecord) -> dict[str, Any]:
    started = record.started
    return {
        "name": record.name,
        "path": str(record.path),
        "status": record.status,
        "model": record.config.get("model"),
        "recipe": record.config.get("recipe"),
        "epochs": int(record.last["epoch"]),
        "planned_epochs": record.config.get("epochs"),
        "best_val_acc": record.best_val_acc,
        "test_acc": record.test_acc,
        "test_loss": record.test_loss,
        "train_seconds": record.train_seconds,
        "date": started.isoformat(timespec="seconds"),
        "_sort": started.timestamp(),
    }


def _broken_overview(path: Path, error: MnistlabError) -> dict[str, Any]:
    """The row of a run that cannot be reported on, with what can still be read."""
    notes: list[str] = []
    config = _optional_json(path / runs.CONFIG, notes) or {}
    record = RunRecord(path, config, [], _optional_json(path / runs.ENVIRONMENT, notes), None)
    try:
        started = record.started
    except OSError:
        started = datetime.fromtimestamp(0).astimezone()
    return {
        "name": path.name,
        "path": str(path),
        "status": "incomplete" if "no complete epoch" in str(error) else "unreadable",
        "model": config.get("model"),
        "recipe": config.get("recipe"),
        "epochs": 0,
        "planned_epochs": config.get("epochs"),
        "best_val_acc": None,
        "test_acc": None,
        "test_loss": None,
        "train_seconds": None,
        "date": started.isoformat(timespec="seconds"),
        "error": str(error),
        "_sort": started.timestamp(),
    }


def format_runs(rows: Sequence[dict[str, Any]]) -> str:
    """The runs table as aligned text."""
    header = ("name", "status", "model", "recipe", "epochs", "best val", "test acc", "train s",
              "date")
    table = [header]
    for r in rows:
        planned = r.get("planned_epochs")
        epochs = f"{r['epochs']}/{planned}" if r["status"] != "complete" and planned else (
            str(r["epochs"]))
        table.append((
            r["name"], r["status"], r.get("model") or "–", r.get("recipe") or "–", epochs,
            _pct(r.get("best_val_acc")), _pct(r.get("test_acc")),
            _fmt(r.get("train_seconds"), "{:.1f}"), r["date"].replace("T", " ")[:16],
        ))
    widths = [max(len(str(row[i])) for row in table) for i in range(len(header))]
    right = {4, 5, 6, 7}
    return "\n".join(
        "  ".join(
            str(v).rjust(widths[i]) if i in right else str(v).ljust(widths[i])
            for i, v in enumerate(row)
        ).rstrip()
        for row in table
    )


def build_comparison(
    run_names: Sequence[str | os.PathLike[str]],
    out: str | os.PathLike[str] = "compare.html",
    *,
    runs_dir: str | os.PathLike[str] = runs.RUNS_DIR,
) -> Report:
    """The runs' curves overlaid and their final numbers in one table, as HTML (+ PNG beside)."""
    if len(run_names) < 2:
        raise MnistlabError("compare needs at least two runs")
    records = [read_run(r, runs_dir) for r in run_names]
    out_path = Path(out)
    if out_path.is_dir():
        raise MnistlabError(f"--out {out_path} is a folder; give the HTML file's path")
    fig_dir = figure_dir_for(out_path)
    labels = _unique_labels(records)

    from . import plots

    curves = ReportFigure(
        "curves", "Curves overlaid",
        "Solid: training loss and test accuracy; dashed: validation, where the run had it.",
        plots.figure_png(plots.plot_comparison(
            {label: r.history for label, r in zip(labels, records, strict=True)})),
    )
    keys = dict.fromkeys(k for r in records for k in r.config)
    differing = [
        (k, [_rows({k: r.config.get(k)})[0][1] if k in r.config else "–" for r in records])
        for k in keys
        if len({json.dumps(r.config.get(k), sort_keys=True) for r in records}) > 1
    ]
    rows = [dict(_overview(r), label=label) for label, r in zip(labels, records, strict=True)]
    try:
        fig_dir.mkdir(parents=True, exist_ok=True)
        png = fig_dir / "curves.png"
        atomic_write_bytes(png, curves.png)
        html = _render(
            "compare.html",
            title="mnistlab comparison: " + ", ".join(labels),
            runs=rows,
            records=records,
            figures=[curves],
            differing=differing,
            figure_dir=os.path.relpath(fig_dir, out_path.parent),
        )
        atomic_write_text(out_path, html)
    except OSError as e:
        raise MnistlabError(f"cannot write the comparison to {out_path}: {e.strerror or e}"
                            ) from None
    return Report(out_path, fig_dir, [png], all(r.complete for r in records), None)


def _unique_labels(records: Sequence[RunRecord]) -> list[str]:
    names = [r.name for r in records]
    return [r.name if names.count(r.name) == 1 else str(r.path) for r in records]


# --- HTML -------------------------------------------------------------------------------------


@functools.cache
def _templates() -> Any:
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATE_DIR),
        autoescape=True,  # every value from a run folder is escaped
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["pct"] = _pct
    env.filters["fmt"] = _fmt
    return env


def _render(template: str, **context: Any) -> str:
    from . import __version__

    return _templates().get_template(template).render(
        version=__version__, generated=time.strftime("%Y-%m-%d %H:%M:%S %z"), **context
    )
