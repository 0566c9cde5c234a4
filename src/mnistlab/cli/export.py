"""`mnistlab export`: weights to ONNX (verified with onnxruntime) or safetensors with a card."""

from __future__ import annotations

from pathlib import Path

import click

from .options import root_option


@click.command()
@click.argument("source", metavar="RUN_OR_WEIGHTS")
@click.option(
    "--onnx",
    "onnx_file",
    type=click.Path(dir_okay=False),
    default=None,
    help="Write an ONNX model (dynamic batch; input: pixels [N,1,28,28] in [0,1]).",
)
@click.option(
    "--safetensors",
    "st_file",
    type=click.Path(dir_okay=False),
    default=None,
    help="Write safetensors weights and a model card (FILE with .json) with the test accuracy.",
)
@click.option("--best", is_flag=True, help="With a run folder: its best validation weights.")
@click.option("--opset", type=click.IntRange(13, 21), default=17, show_default=True)
@click.option("--force", is_flag=True, help="Overwrite existing output files.")
@click.option("--runs-dir", default="runs", show_default=True)
@root_option
def export(source, onnx_file, st_file, best, opset, force, runs_dir, root) -> None:
    """Export a run or weights file; ONNX is checked against PyTorch on the whole test set."""
    from ..errors import MnistlabError

    if not onnx_file and not st_file:
        raise click.UsageError("say what to write: --onnx FILE and/or --safetensors FILE")
    for target in filter(None, (onnx_file, st_file)):
        if Path(target).exists() and not force:
            raise MnistlabError(f"{target} exists; use --force to overwrite it")
        if not Path(target).parent.is_dir():
            raise MnistlabError(f"cannot write {target}: its folder does not exist")

    from .. import export as ex
    from ..runs import find_run

    path = Path(source)
    if not path.exists():
        path = find_run(source, runs_dir)
    if st_file:
        card = ex.export_safetensors(path, st_file, root=root, best=best)
        click.echo(f"wrote {st_file} and its model card {Path(st_file).with_suffix('.json')}")
        click.echo(f"test accuracy of the written file: {card['test_accuracy']:.2f}%")
    if onnx_file:
        check = ex.write_onnx(path, onnx_file, root=root, best=best, opset=opset)
        click.echo(f"wrote {onnx_file} (opset {opset}, dynamic batch dimension)")
        click.echo(
            f"onnxruntime vs PyTorch on {check.images:,} MNIST test images: arg-max agreement "
            f"{check.agreement:.2f}%, max |logit diff| {check.max_abs_diff:.2e} "
            f"(limit {ex.LOGIT_TOLERANCE:g})"
        )
