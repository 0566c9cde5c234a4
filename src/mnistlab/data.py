"""MNIST on disk → uint8 tensors → normalized batches.

The whole split lives in memory as one tensor; batches are index slices of it, so no per-sample
Python runs while training. Decoded arrays are cached in memory and on disk, keyed by the source
file's path, size and mtime, so a second load costs a file read, not a gunzip and a checksum.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .catalog import MNIST, DatasetSpec
from .download import default_mirrors, download_file, verify_file
from .errors import DataError
from .fileio import atomic_write
from .idx import read_idx_bytes

ROOT_ENV = "MNISTLAB_DATA"
CACHE_ENV = "MNISTLAB_CACHE"
DEFAULT_ROOT = "./data"
SPLITS = ("train", "test")

_memory_cache: dict[tuple, np.ndarray] = {}


def resolve_root(root: str | os.PathLike[str] | None = None) -> Path:
    """The data root: `root` if given, else `$MNISTLAB_DATA`, else ./data (the lab's default)."""
    if root is None or str(root) == "":
        root = os.environ.get(ROOT_ENV) or DEFAULT_ROOT
    return Path(root).expanduser()


def raw_dir(root: str | os.PathLike[str] | None = None, spec: DatasetSpec = MNIST) -> Path:
    """torchvision's layout: <root>/MNIST/raw."""
    return resolve_root(root) / spec.folder / "raw"


def find_file(root: str | os.PathLike[str] | None, name: str, spec: DatasetSpec = MNIST):
    """The path of `name` or `name.gz` under the raw folder, or None if neither exists."""
    folder = raw_dir(root, spec)
    for candidate in (folder / name, folder / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _cache_dir() -> Path | None:
    env = os.environ.get(CACHE_ENV)
    if env == "":
        return None  # MNISTLAB_CACHE= (empty) turns the disk cache off
    base = Path(env) if env else Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")) / "mnistlab"
    return base.expanduser()


def _load_verified(path: Path, expected_sha256: str, expect_ndim: int) -> np.ndarray:
    """Decode and verify one IDX file, through the memory and disk caches."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns, expected_sha256)
    if key in _memory_cache:
        return _memory_cache[key]
    cache = _cache_dir()
    cache_file = None
    if cache is not None:
        digest = hashlib.sha256(repr(key).encode()).hexdigest()[:24]
        cache_file = cache / f"{path.name.split('.')[0]}-{digest}.npy"
        try:
            array = np.load(cache_file, allow_pickle=False)
            if array.dtype == np.uint8 and array.ndim == expect_ndim:
                _memory_cache[key] = array
                return array
        except (OSError, ValueError, EOFError):
            pass  # no usable cache entry: decode below
    array, sha = read_idx_bytes(path, expect_ndim)
    if sha != expected_sha256:
        raise DataError(
            f"{path} does not hold the expected content (SHA-256 {sha[:12]}…, expected "
            f"{expected_sha256[:12]}…); delete it and run `mnistlab data download`"
        )
    array = array.copy()  # own the memory instead of pinning the decompressed bytes
    if cache_file is not None:
        try:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(cache_file, lambda f: np.save(f, array, allow_pickle=False))
        except OSError:
            pass  # a cache is an optimization; an unwritable one is not an error
    _memory_cache[key] = array
    return array


def download(
    root: str | os.PathLike[str] | None = None,
    spec: DatasetSpec = MNIST,
    mirrors: Sequence[str] | None = None,
    force_check: bool = True,
) -> dict[str, Path]:
    """Make sure every file of `spec` is under the root and verified; download what is missing.

    A present file that fails verification is replaced only once a verified copy has arrived.
    """
    folder = raw_dir(root, spec)
    paths: dict[str, Path] = {}
    missing: list[tuple[str, Path | None]] = []
    for name in spec.files:
        path = find_file(root, name, spec)
        if path is not None and (not force_check or verify_file(path, spec.sha256[name])):
            paths[name] = path
        else:
            missing.append((name, path))
    if not missing:
        return paths  # complete and verified: no need to write (the root may be read-only)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".mnistlab-write-test"
        probe.touch()
        probe.unlink()
    except OSError as e:
        raise DataError(
            f"cannot write to data root {folder}: {e.strerror or e}; choose another with --root"
        ) from None
    mirrors = list(mirrors) if mirrors else default_mirrors(spec)
    for name, path in missing:
        new = download_file(name, folder, spec.sha256[name], mirrors)
        if path is not None and path != new:
            path.unlink(missing_ok=True)  # the bad copy would shadow the verified .gz
        paths[name] = new
    return {name: paths[name] for name in spec.files}


def load_split(
    root: str | os.PathLike[str] | None = None,
    split: str = "train",
    spec: DatasetSpec = MNIST,
    download_missing: bool = False,
    mirrors: Sequence[str] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Images uint8 [N, 28, 28] and labels int64 [N] of one split, verified against the catalog."""
    if split not in spec.splits:
        raise DataError(f"unknown split {split!r}; choose one of: {', '.join(spec.splits)}")
    image_name, label_name = spec.splits[split]
    paths = []
    for name in (image_name, label_name):
        path = find_file(root, name, spec)
        if path is None and download_missing:
            download(root, spec, mirrors, force_check=False)
            path = find_file(root, name, spec)
        if path is None:
            raise DataError(
                f"{name}[.gz] not found in {raw_dir(root, spec)}; run `mnistlab data download` "
                f"or point --root / ${ROOT_ENV} at a folder that has {spec.folder}/raw"
            )
        paths.append(path)
    images = _load_verified(paths[0], spec.sha256[image_name], expect_ndim=3)
    labels = _load_verified(paths[1], spec.sha256[label_name], expect_ndim=1)
    if len(images) != len(labels):
        raise DataError(f"{split}: {len(images)} images but {len(labels)} labels")
    return torch.from_numpy(images), torch.from_numpy(labels).long()


def load_mnist(
    root: str | os.PathLike[str] | None = None, split: str = "train", download: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """MNIST images uint8 [N, 28, 28] and labels int64 [N]; `download` fetches missing files."""
    return load_split(root, split, MNIST, download_missing=download)


def mean_std(images: torch.Tensor) -> tuple[float, float]:
    """Mean and standard deviation of uint8 images scaled to [0, 1] (population std)."""
    x = images.to(torch.float64).div_(255.0)
    return float(x.mean()), float(x.std(correction=0))


def normalize(
    images: torch.Tensor, mean: float = MNIST.mean, std: float = MNIST.std
) -> torch.Tensor:
    """uint8 [N, 28, 28] → float32 [N, 1, 28, 28], scaled to [0, 1] then standardized."""
    a, b = _affine(mean, std)
    return images.to(torch.float32).mul_(a).add_(b).unsqueeze(1)


def _affine(mean: float, std: float) -> tuple[float, float]:
    """(a, b) with (x/255 - mean)/std = x * a + b: one multiply and one add per pixel."""
    return 1.0 / (255.0 * std), -mean / std


def split_indices(
    labels: torch.Tensor,
    val: float | int,
    seed: int = 0,
    stratify: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded train/validation index split; `val` is a fraction in (0, 1) or a count.

    The lab's split is `val=10000` on the 60,000 training images (50,000 / 10,000).
    """
    n = len(labels)
    n_val = round(val * n) if isinstance(val, float) else int(val)
    if isinstance(val, float) and not 0.0 < val < 1.0:
        raise DataError(f"validation fraction must be between 0 and 1, got {val}")
    if not 0 < n_val < n:
        raise DataError(f"validation size must be between 1 and {n - 1}, got {n_val}")
    g = torch.Generator().manual_seed(seed)
    if not stratify:
        perm = torch.randperm(n, generator=g)
        return perm[n_val:].sort().values, perm[:n_val].sort().values
    val_parts = []
    classes = labels.unique()
    # Largest-remainder allocation so the class quotas add up to exactly n_val.
    counts = torch.stack([(labels == c).sum() for c in classes]).double()
    exact = counts * n_val / n
    quota = exact.floor().long()
    for i in torch.argsort(exact - quota, descending=True)[: n_val - int(quota.sum())]:
        quota[i] += 1
    for c, q in zip(classes, quota, strict=True):
        idx = (labels == c).nonzero().squeeze(1)
        val_parts.append(idx[torch.randperm(len(idx), generator=g)[: int(q)]])
    val_idx = torch.cat(val_parts).sort().values
    mask = torch.ones(n, dtype=torch.bool)
    mask[val_idx] = False
    return mask.nonzero().squeeze(1), val_idx


class BatchLoader:
    """Batches from one in-memory tensor: `for x, y in loader` → float32 [B,1,28,28], int64 [B].

    uint8 images stay uint8 on `device` (a quarter of the memory, and no pass over all of them
    up front); each batch is normalized as it is drawn, with the same arithmetic as `normalize`.
    Float images are used as they are. Each pass draws a fresh permutation from (seed, epoch), so
    the order is reproducible and a resumed run can pick up the same order with `set_epoch`.

    With `world` > 1 (one loader per process of a distributed run, `rank` its index), a shuffled
    loader yields this rank's share of every batch of the epoch's permutation, so the batch that
    all ranks take together is the one a single process would (a final batch with fewer samples
    than ranks is dropped); `share` is this rank's fraction of the batch last drawn. An unshuffled
    (evaluation) loader yields every `world`-th batch instead.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        batch_size: int = 64,
        shuffle: bool = False,
        seed: int = 0,
        drop_last: bool = False,
        device: str | torch.device = "cpu",
        mean: float = MNIST.mean,
        std: float = MNIST.std,
        rank: int = 0,
        world: int = 1,
    ) -> None:
        if batch_size <= 0:
            raise DataError(f"batch size must be positive, got {batch_size}")
        if not 0 <= rank < world:
            raise DataError(f"rank must be in [0, {world}), got {rank}")
        if shuffle and batch_size < world:
            raise DataError(f"a batch of {batch_size} cannot give each of {world} processes a "
                            f"sample: use a batch size of at least {world}")
        if len(images) != len(labels):
            raise DataError(f"{len(images)} images but {len(labels)} labels")
        if images.dtype == torch.uint8:
            self.x = images.unsqueeze(1).to(device).contiguous()  # [N, 1, 28, 28] uint8
            self._affine: tuple[float, float] | None = _affine(mean, std)
        else:
            self.x = images.float().to(device).contiguous()
            self._affine = None
        self.y = labels.to(device=device, dtype=torch.long)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.epoch = 0
        self.rank, self.world = rank, world
        self.share = 1.0

    def _stop(self) -> int:
        """How many samples of a pass are drawn."""
        n, b = len(self.y), self.batch_size
        stop = n - n % b if self.drop_last else n
        if self.world > 1 and self.shuffle and 0 < stop % b < self.world:
            stop -= stop % b  # a last batch that cannot give every rank a sample
        return stop

    def __len__(self) -> int:
        batches = -(-self._stop() // self.batch_size)
        if self.world > 1 and not self.shuffle:
            return len(range(self.rank, batches, self.world))
        return batches

    @property
    def num_samples(self) -> int:
        return len(self.y)

    def set_epoch(self, epoch: int) -> None:
        """The next pass uses the order of `epoch` (0-based)."""
        self.epoch = epoch

    def order(self, epoch: int) -> torch.Tensor:
        """The sample order of pass `epoch`: a permutation if shuffling, else 0..N-1."""
        n = len(self.y)
        if not self.shuffle:
            return torch.arange(n)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(n, generator=g)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        epoch, self.epoch = self.epoch, self.epoch + 1
        b, stop, world = self.batch_size, self._stop(), self.world
        x, y = self.x, self.y
        if not self.shuffle:
            for i in range(self.rank * b, stop, b * world):  # contiguous slices: views, no copy
                yield self._float(x[i : i + b]), y[i : i + b]
            return
        perm = self.order(epoch).to(x.device)
        for i in range(0, stop, b):
            idx = perm[i : i + b]
            if world > 1:
                mine = idx[self.rank :: world]
                self.share = len(mine) / len(idx)
                idx = mine
            yield self._float(x.index_select(0, idx)), y.index_select(0, idx)

    def _float(self, x: torch.Tensor) -> torch.Tensor:
        if self._affine is None:
            return x
        return (x * self._affine[0]).add_(self._affine[1])  # uint8 * float → float32


class MNISTDataset(torch.utils.data.Dataset):
    """A standard map-style Dataset over the same tensors, for people who want a DataLoader."""

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        mean: float = MNIST.mean,
        std: float = MNIST.std,
    ) -> None:
        self.images, self.labels, self.mean, self.std = images, labels, mean, std

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        x = self.images[i].to(torch.float32).div(255.0).sub(self.mean).div(self.std)
        return x.unsqueeze(0), int(self.labels[i])


@dataclass
class SplitInfo:
    count: int
    shape: list[int]
    dtype: str
    class_counts: list[int]
    mean: float | None = None
    std: float | None = None


def dataset_info(root: str | os.PathLike[str] | None = None, spec: DatasetSpec = MNIST) -> dict:
    """What `mnistlab data info` reports: per split count, shape, class counts; train mean/std."""
    info: dict = {"root": str(resolve_root(root)), "dataset": spec.name, "files": {}}
    for split in spec.splits:
        for name in spec.splits[split]:
            path = find_file(root, name, spec)
            info["files"][name] = str(path) if path else None
        images, labels = load_split(root, split, spec)
        s = SplitInfo(
            count=len(labels),
            shape=list(images.shape[1:]),
            dtype=str(images.dtype).removeprefix("torch."),
            class_counts=torch.bincount(labels, minlength=len(spec.classes)).tolist(),
        )
        if split == "train":
            s.mean, s.std = mean_std(images)
        info[split] = {k: v for k, v in s.__dict__.items() if v is not None}
    # load_split raises unless every file's content digest matched the catalog.
    info["verified"] = True
    return info
