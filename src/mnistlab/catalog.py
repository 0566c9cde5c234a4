"""Datasets described as data: adding Fashion-MNIST or KMNIST is one more entry here."""

from __future__ import annotations

from dataclasses import dataclass

from .errors import DataError


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    folder: str  # torchvision's folder name under the data root: <root>/<folder>/raw
    splits: dict[str, tuple[str, str]]  # split -> (images file, labels file), without .gz
    sha256: dict[str, str]  # file -> SHA-256 of its decompressed content
    counts: dict[str, int]
    classes: tuple[str, ...]
    image_shape: tuple[int, int]
    mean: float  # of training pixels scaled to [0, 1]
    std: float
    mirrors: tuple[str, ...]

    @property
    def files(self) -> tuple[str, ...]:
        return tuple(name for pair in self.splits.values() for name in pair)


MNIST = DatasetSpec(
    name="mnist",
    folder="MNIST",
    splits={
        "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
        "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
    },
    sha256={
        "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
        "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
        "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
        "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
    },
    counts={"train": 60000, "test": 10000},
    classes=tuple(str(d) for d in range(10)),
    image_shape=(28, 28),
    mean=0.1307,
    std=0.3081,
    # The mirrors torchvision uses, in its order.
    mirrors=(
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        "http://yann.lecun.com/exdb/mnist/",
    ),
)

DATASETS: dict[str, DatasetSpec] = {spec.name: spec for spec in (MNIST,)}


def get_dataset(name: str) -> DatasetSpec:
    try:
        return DATASETS[name.lower()]
    except KeyError:
        raise DataError(f"unknown dataset {name!r}; known: {', '.join(sorted(DATASETS))}") from None
