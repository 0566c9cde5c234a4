"""`mnistlab lr-find`: the learning-rate range test on a recipe, its plot and its suggestion."""

from __future__ import annotations

import json

import click

from .options import root_option


@click.command("lr-find")
@click.option("--recipe", default="lab", show_default=True, help="Recipe whose setup is tested.")
@click.option("--model", default=None, help="Model name (default: the recipe's).")
@click.option("--optimizer", default=None, help="adam, adamw, sgd or rmsprop (default: recipe's).")
@click.option("--batch-size", type=int, default=None, help="Batch size (default: the recipe's).")
@click.option("--seed", type=int, default=None, help="Random seed (default: the recipe's).")
@click.option("--threads", type=int, default=None, help="Torch CPU threads; 0: automatic.")
@click.option("--train-limit", type=int, default=None, help="Use the first N training images.")
@click.option("--steps", type=click.IntRange(10, 10_000), default=300, show_default=True,
              help="Steps of the sweep (it stops earlier if the loss diverges).")
@click.option("--start-lr", type=float, default=1e-7, show_default=True)
@click.option("--end-lr", type=float, default=10.0, show_default=True)
@click.option("--json", "as_json", is_flag=True,
              help='Print {"suggested_lr", "rule", "lrs", "losses", ...} as one JSON object.')
@click.option("--out", type=click.Path(dir_okay=False), default=None, metavar="PNG",
              help="Write the plot of smoothed loss against learning rate to this PNG.")
@click.option("--force", is_flag=True, help="Overwrite an existing --out file.")
@root_option
def lr_find(recipe, model, optimizer, batch_size, seed, threads, train_limit, steps, start_lr,
            end_lr, as_json, out, force, root) -> None:
    """Sweep the learning rate exponentially over a few hundred steps, stop on divergence, and
    suggest a rate (with the rule used). `mnistlab train --lr auto` uses the suggestion."""
    from ..config import resolve_config

    cfg = resolve_config(recipe, model=model, optimizer=optimizer, batch_size=batch_size,
                         seed=seed, threads=threads, train_limit=train_limit)
    _check_out(out, force)

    import torch

    from ..hardware import decide, describe
    from ..lrfind import lr_find as run

    torch.set_num_threads(decide(describe(), cfg).threads.value)  # --threads checked here too
    result = run(cfg, root, start_lr=start_lr, end_lr=end_lr, steps=steps)
    if out is not None:
        from .. import plots

        plots.save_figure(plots.plot_lr_find(result.lrs, result.losses, result.suggested_lr,
                                             result.raw_losses, result.rule), out)
    if as_json:
        click.echo(json.dumps(result.to_dict()))
        return
    click.echo(f"{cfg.model} with {cfg.optimizer}, batch {cfg.batch_size} (recipe {recipe}): "
               f"{len(result.lrs)} steps from {result.lrs[0]:.3g} to {result.lrs[-1]:.3g} "
               f"({result.stopped}) in {result.seconds:.1f}s")
    click.echo(f"suggested lr: {result.suggested_lr:.3g}")
    click.echo(f"rule: {result.rule}")
    if out is not None:
        click.echo(f"plot: {out}")


def _check_out(out: str | None, force: bool) -> None:
    """--out must be a new PNG in an existing folder (or --force): checked before the sweep."""
    from pathlib import Path

    from ..errors import MnistlabError

    if out is None:
        return
    path = Path(out)
    if path.exists() and not force:
        raise MnistlabError(f"{out} exists; use --force to overwrite it")
    if not path.parent.is_dir():
        raise MnistlabError(f"cannot write {out}: its folder does not exist")
