"""`mnistlab evaluate`: metrics of a run or a weights file on one split."""

from __future__ import annotations

import json

import click

from .options import json_option, root_option


@click.command()
@click.argument("source", metavar="RUN_OR_WEIGHTS")
@click.option(
    "--split",
    type=click.Choice(["test", "val", "train"]),
    default="test",
    show_default=True,
    help="val: the run's own validation split.",
)
@click.option("--best", is_flag=True, help="Use the run's best validation weights.")
@click.option(
    "--model",
    "model_name",
    default=None,
    help="Architecture of a bare weights file. Default: from its metadata, else by its shapes.",
)
@click.option("--runs-dir", default="runs", show_default=True)
@click.option(
    "--tta",
    is_flag=True,
    help="Test-time augmentation: average over shifted and rotated views; says what it changes.",
)
@json_option
@root_option
def evaluate(source, split, best, model_name, runs_dir, tta, as_json, root) -> None:
    """Accuracy, loss, per-class report, confusion matrix and most-confused pairs."""
    from pathlib import Path

    from ..checkpoints import load_model
    from ..data import BatchLoader, load_mnist, split_indices
    from ..errors import MnistlabError
    from ..metrics import classification_metrics, format_report
    from ..runs import find_run
    from ..training import predict_logits

    path = Path(source)
    if not path.exists():
        path = find_run(source, runs_dir)
    model, info = load_model(path, model_name, best=best)
    config = info.get("config", {})
    images, labels = load_mnist(root, "test" if split == "test" else "train")
    if split != "test":
        if config.get("train_limit"):  # the run saw only these; its split was made from them
            images, labels = images[: config["train_limit"]], labels[: config["train_limit"]]
        fraction = config.get("val_split") or 0.0
        if split == "val" and not fraction:
            raise MnistlabError(f"{source} has no validation split; use --split test or train")
        if fraction:
            train_idx, val_idx = split_indices(labels, fraction, seed=config.get("seed", 0))
            keep = val_idx if split == "val" else train_idx
            images, labels = images[keep], labels[keep]
    loader = BatchLoader(images, labels, batch_size=1000)
    logits, y = predict_logits(model, loader)
    change = None
    if tta:
        from ..tta import tta_scores

        tta_logits, change = tta_scores(model, images, y, logits)
        logits = tta_logits  # the metrics below are those with TTA
    metrics = classification_metrics(logits, y)
    metrics.update(model=info["model"], source=str(path), split=split)
    if change is not None:
        metrics["tta"] = change.to_dict()
    if as_json:
        click.echo(json.dumps(metrics))
    else:
        click.echo(f"{info['model']} from {path}, {split} split"
                   + (", with test-time augmentation" if tta else ""))
        if change is not None:
            click.echo(change.line())
        click.echo(format_report(metrics))
