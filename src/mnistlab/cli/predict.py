"""`mnistlab predict`: read digits from image files, folders or standard input."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import click

STDIN = "-"
CHUNK = 256  # files preprocessed, then predicted in one forward pass


def iter_inputs(paths: tuple[str, ...]) -> Iterator[tuple[str, Path | None]]:
    """(shown name, path) per input: files as given, folders' files recursively, sorted by path.

    A path that does not exist comes through as is, so it is reported in its turn.
    """
    for arg in paths:
        if arg == STDIN:
            yield "<stdin>", None
            continue
        path = Path(arg)
        if not path.is_dir():
            yield arg, path
            continue
        files = sorted(Path(d) / name for d, _, names in os.walk(path) for name in names)
        if not files:
            yield arg, path  # reported as "a folder with no files"
        for file in files:
            yield str(file), file


def _message(shown: str, error: Exception) -> str:
    text = str(error)
    return text if text.startswith(f"{shown}: ") else f"{shown}: {text}"


@click.command()
@click.argument("paths", nargs=-1, required=True, metavar="PATH...")
@click.option(
    "--model",
    "model_spec",
    default=None,
    metavar="RUN_OR_WEIGHTS",
    help="A run folder or weights file (.pt, .safetensors). Default: the bundled model.",
)
@click.option("--best", is_flag=True, help="With a run folder: its best validation weights.")
@click.option(
    "--top-k", type=click.IntRange(1, 10), default=3, show_default=True, help="Digits to list."
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON list of predictions.")
@click.option(
    "--csv",
    "csv_file",
    type=click.Path(dir_okay=False),
    default=None,
    help="Write path,label,probability,p0..p9 to this file.",
)
@click.option("--force", is_flag=True, help="Overwrite an existing --csv file.")
@click.option(
    "--tta",
    is_flag=True,
    help="Test-time augmentation: average over shifted and rotated views; says how many "
    "readings it changed.",
)
@click.option(
    "--save-preprocessed",
    type=click.Path(file_okay=False),
    default=None,
    metavar="DIR",
    help="Write the 28×28 image the model saw for each input, as PNG.",
)
def predict(paths, model_spec, best, top_k, as_json, csv_file, force, tta,
            save_preprocessed) -> None:
    """Predict the digit in each image (PNG, JPEG, BMP, GIF, WebP, TIFF; `-` reads stdin).

    Folders are read recursively in sorted order. A bad file is reported on one line and skipped;
    the exit status is 1 if any input failed.
    """
    from ..errors import MnistlabError

    if as_json and csv_file:
        raise click.UsageError("--json and --csv are exclusive: choose one")
    if csv_file and Path(csv_file).exists() and not force:
        raise MnistlabError(f"{csv_file} exists; use --force to overwrite it")
    if csv_file and not Path(csv_file).parent.is_dir():
        raise MnistlabError(f"cannot write {csv_file}: its folder does not exist")
    if paths.count(STDIN) > 1:
        raise click.UsageError("standard input (-) can be read only once")

    import torch

    from ..predict import Predictor
    from ..preprocess import open_image, to_mnist

    predictor = Predictor.load(model_spec, best=best)
    out_dir = Path(save_preprocessed) if save_preprocessed else None
    if out_dir is not None:
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise MnistlabError(f"cannot create {out_dir}: {e.strerror or e}") from None

    rows: list[dict] = []
    failed = total = 0
    changed = 0  # readings that --tta changed

    def flush(batch: list[tuple[int, str, torch.Tensor]]) -> None:
        nonlocal changed
        if not batch:
            return
        pixels = torch.stack([x for _, _, x in batch])
        predictions = predictor.predict_pixels(pixels, tta=tta)
        if tta:
            changed += int((predictor.predict_pixels(pixels).labels != predictions.labels).sum())
        for (index, shown, _), p in zip(batch, predictions, strict=True):
            p.path = shown
            if out_dir is not None:
                _save_png(p.image, out_dir / f"{index:05d}-{_safe_name(shown)}.png")
            if as_json or csv_file:
                rows.append(p.to_dict(top_k))
            else:
                ranked = ", ".join(f"{d} {prob:.1%}" for d, prob in p.top_k(top_k))
                click.echo(f"{shown}: {p.label} ({p.probability:.1%})  top-{top_k}: {ranked}")
        batch.clear()

    batch: list[tuple[int, str, torch.Tensor]] = []
    for shown, path in iter_inputs(paths):
        total += 1
        try:
            if path is None:
                source = sys.stdin.buffer
            elif path.is_dir():
                raise MnistlabError("a folder with no files in it")
            elif not path.exists() and not path.is_symlink():
                raise MnistlabError("no such file or folder")
            else:
                source = path
            batch.append((total - 1, shown, to_mnist(open_image(source))))
        except MnistlabError as e:
            failed += 1
            click.echo(f"mnistlab: error: {_message(shown, e)}", err=True)
        if len(batch) >= CHUNK:
            flush(batch)
    flush(batch)

    if tta:
        click.echo(f"test-time augmentation changed {changed} of {total - failed} readings",
                   err=True)
    if as_json:
        click.echo(json.dumps(rows))
    elif csv_file:
        _write_csv(csv_file, rows)
        click.echo(f"wrote {len(rows)} predictions to {csv_file}", err=True)
    if failed:
        raise MnistlabError(
            f"{failed} of {total} inputs failed; the other {total - failed} were predicted"
            if total > failed
            else f"no input could be read ({failed} failed)"
        )


def _safe_name(shown: str) -> str:
    name = Path(shown).name if shown != "<stdin>" else "stdin"
    stem = name.rsplit(".", 1)[0] if "." in name[1:] else name
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in stem)[:80] or "image"


def _save_png(image, path: Path) -> None:
    import numpy as np
    from PIL import Image

    from ..fileio import atomic_path

    pixels = (image.clamp(0, 1).numpy() * 255).round().astype(np.uint8)
    with atomic_path(path) as tmp:
        Image.fromarray(pixels, "L").save(tmp, format="PNG")


def _write_csv(target: str, rows: list[dict]) -> None:
    import csv
    import io

    from ..fileio import atomic_write_text

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["path", "label", "probability", *(f"p{d}" for d in range(10))])
    for r in rows:
        probs = [f"{p:.6f}" for p in r["probabilities"]]
        writer.writerow([r["path"], r["label"], f"{r['probability']:.6f}", *probs])
    atomic_write_text(target, buf.getvalue())
