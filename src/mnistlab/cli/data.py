"""`mnistlab data`: download, verify and inspect MNIST."""

from __future__ import annotations

import json

import click

from .options import json_option, mirror_option, root_option


@click.group()
def data() -> None:
    """Download, verify and inspect MNIST."""


@data.command()
@root_option
@mirror_option
def download(root: str | None, mirrors: tuple[str, ...]) -> None:
    """Download missing files into the data root and verify every file."""
    from ..data import download as fetch
    from ..data import raw_dir

    paths = fetch(root, mirrors=list(mirrors) or None)
    for name, path in paths.items():
        click.echo(f"verified {name}: {path}")
    click.echo(f"MNIST is ready in {raw_dir(root)}")


@data.command()
@root_option
@json_option
def info(root: str | None, as_json: bool) -> None:
    """Counts, shapes, class counts, mean and std of each split."""
    from ..data import dataset_info

    report = dataset_info(root)
    if as_json:
        click.echo(json.dumps(report))
        return
    click.echo(f"root: {report['root']}")
    for split in ("train", "test"):
        s = report[split]
        click.echo(
            f"{split}: {s['count']} images of {'x'.join(map(str, s['shape']))} {s['dtype']}"
        )
        click.echo(f"  class counts: {' '.join(map(str, s['class_counts']))}")
        if "mean" in s:
            click.echo(f"  mean {s['mean']:.4f}, std {s['std']:.4f} (pixels in [0, 1])")
    click.echo("verified: all files match the canonical MNIST content digests")


@data.command()
@click.argument("index", type=int)
@click.option("--split", type=click.Choice(["train", "test"]), default="train", show_default=True)
@click.option("--normalized", is_flag=True, help="Show the normalized tensor the model sees.")
@click.option(
    "--out",
    type=click.Path(dir_okay=False, writable=True),
    default=None,
    help="PNG file to write. Default: <split>-<index>[-normalized].png",
)
@root_option
def show(index: int, split: str, normalized: bool, out: str | None, root: str | None) -> None:
    """Draw one sample with every pixel value written on it and a colour bar."""
    from ..data import load_mnist, normalize
    from ..errors import DataError
    from ..plots import display_image, save_figure

    images, labels = load_mnist(root, split)
    if not -len(labels) <= index < len(labels):
        raise DataError(f"index {index} out of range: the {split} split has {len(labels)} images")
    label = int(labels[index])
    if normalized:
        image = normalize(images[index].unsqueeze(0))[0]  # a slice breaks for index -1
        shape = tuple(image.shape)
        click.echo(f"type: torch.Tensor, shape: {shape}, dtype: float32, label: {label}")
        click.echo(f"min {float(image.min()):.4f}, max {float(image.max()):.4f}")
    else:
        image = images[index]
        size = tuple(image.shape)
        click.echo(f"type: grayscale image, size: {size}, dtype: uint8, label: {label}")
    fig = display_image(image, label, normalized=normalized)
    out = out or f"{split}-{index}{'-normalized' if normalized else ''}.png"
    save_figure(fig, out)
    click.echo(f"wrote {out}")
