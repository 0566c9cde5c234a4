"""The data layer on the real MNIST files: the lab's numbers, the split, the batch loader."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mnistlab import data as mdata
from mnistlab.catalog import MNIST, get_dataset
from mnistlab.data import (
    BatchLoader,
    MNISTDataset,
    load_mnist,
    mean_std,
    normalize,
    resolve_root,
    split_indices,
)
from mnistlab.errors import DataError

TRAIN_CLASS_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
TEST_CLASS_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


@pytest.fixture(scope="module")
def train(data_root: Path) -> tuple[torch.Tensor, torch.Tensor]:
    return load_mnist(data_root, "train")


@pytest.fixture(scope="module")
def train_x(train) -> torch.Tensor:
    """The training images normalized once; BatchLoader takes float input as is (no copy)."""
    return normalize(train[0])


@pytest.fixture(scope="module")
def test_split(data_root: Path) -> tuple[torch.Tensor, torch.Tensor]:
    return load_mnist(data_root, "test")


# --- the lab's figures -------------------------------------------------------------------------


def test_train_counts_shapes_dtypes(train):
    images, labels = train
    assert images.shape == (60000, 28, 28)
    assert images.dtype == torch.uint8
    assert labels.shape == (60000,)
    assert labels.dtype == torch.int64
    assert int(labels.min()) == 0 and int(labels.max()) == 9


def test_test_counts_shapes_dtypes(test_split):
    images, labels = test_split
    assert images.shape == (10000, 28, 28)
    assert images.dtype == torch.uint8
    assert labels.shape == (10000,)
    assert labels.dtype == torch.int64


def test_class_counts(train, test_split):
    assert torch.bincount(train[1], minlength=10).tolist() == TRAIN_CLASS_COUNTS
    assert torch.bincount(test_split[1], minlength=10).tolist() == TEST_CLASS_COUNTS


def test_mean_std_match_the_lab(train):
    mean, std = mean_std(train[0])
    assert round(mean, 4) == 0.1307
    assert round(std, 4) == 0.3081
    # and they are the catalog's constants
    assert (round(mean, 4), round(std, 4)) == (MNIST.mean, MNIST.std)


def test_train_sample_0_is_a_5(train):
    images, labels = train
    assert int(labels[0]) == 5
    assert images[0].shape == (28, 28)
    # the raw image spans the full byte range
    assert int(images[0].min()) == 0 and int(images[0].max()) == 255


def test_first_test_labels(test_split):
    # the canonical start of the MNIST test labels
    assert test_split[1][:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]


def test_normalized_sample_0(train):
    x = normalize(train[0][:1])[0]
    assert x.shape == (1, 28, 28)
    assert x.dtype == torch.float32
    assert float(x.min()) == pytest.approx(-0.4242, abs=5e-5)
    assert float(x.max()) == pytest.approx(2.8215, abs=5e-5)


def test_normalize_formula_and_whole_tensor(train):
    images = train[0][:256]
    x = normalize(images)
    assert x.shape == (256, 1, 28, 28)
    expected = (images.double() / 255.0 - 0.1307) / 0.3081
    torch.testing.assert_close(x.squeeze(1).double(), expected, atol=1e-5, rtol=0)
    assert images.dtype == torch.uint8  # the input is not modified in place


def test_normalized_training_set_is_standardized(train_x):
    x = train_x
    assert float(x.mean()) == pytest.approx(0.0, abs=1e-3)
    assert float(x.std()) == pytest.approx(1.0, abs=1e-3)


def test_second_load_is_cached_and_equal(data_root, train):
    images, labels = load_mnist(data_root, "train")
    assert torch.equal(images, train[0])
    assert torch.equal(labels, train[1])


def test_unknown_split_and_dataset():
    with pytest.raises(DataError, match="unknown split 'validation'"):
        load_mnist(None, "validation")
    with pytest.raises(DataError, match="unknown dataset 'cifar'"):
        get_dataset("cifar")
    assert get_dataset("MNIST") is MNIST


def test_resolve_root(monkeypatch, tmp_path):
    monkeypatch.setenv("MNISTLAB_DATA", str(tmp_path))
    assert resolve_root(None) == tmp_path
    assert resolve_root("elsewhere") == Path("elsewhere")
    monkeypatch.delenv("MNISTLAB_DATA")
    assert resolve_root(None) == Path("./data")


def test_missing_files_error_names_the_folder(tmp_path):
    with pytest.raises(DataError) as err:
        load_mnist(tmp_path, "test")
    message = str(err.value)
    assert "t10k-images-idx3-ubyte" in message
    assert str(tmp_path / "MNIST" / "raw") in message
    assert "mnistlab data download" in message


def test_disk_cache_written_and_used(data_root, monkeypatch, tmp_path):
    """A fresh in-memory cache reads the .npy entry, not the .gz; a broken entry is ignored."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("MNISTLAB_CACHE", str(cache))
    monkeypatch.setattr(mdata, "_memory_cache", {})
    images, labels = load_mnist(data_root, "test")
    entries = sorted(p.name for p in cache.iterdir())
    assert len(entries) == 2 and all(e.endswith(".npy") for e in entries), entries

    # Warm: the decoder must not run at all.
    monkeypatch.setattr(mdata, "_memory_cache", {})
    calls = []
    real = mdata.read_idx_bytes
    monkeypatch.setattr(mdata, "read_idx_bytes", lambda *a, **k: calls.append(a) or real(*a, **k))
    warm_images, warm_labels = load_mnist(data_root, "test")
    assert calls == []
    assert torch.equal(warm_images, images) and torch.equal(warm_labels, labels)

    # A truncated or emptied cache entry falls back to decoding, it is not an error.
    for entry in cache.iterdir():
        entry.write_bytes(b"")
    monkeypatch.setattr(mdata, "_memory_cache", {})
    again_images, _ = load_mnist(data_root, "test")
    assert len(calls) == 2
    assert torch.equal(again_images, images)


def test_disk_cache_can_be_turned_off(data_root, monkeypatch, tmp_path):
    monkeypatch.setenv("MNISTLAB_CACHE", "")
    monkeypatch.setattr(mdata, "_memory_cache", {})
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("HOME", str(tmp_path))
    load_mnist(data_root, "test")
    assert list(tmp_path.iterdir()) == []


# --- validation split --------------------------------------------------------------------------


def test_lab_split_50000_10000(train):
    labels = train[1]
    tr, va = split_indices(labels, 10000, seed=0)
    assert len(tr) == 50000 and len(va) == 10000
    assert tr.dtype == torch.int64 and va.dtype == torch.int64
    both = torch.cat([tr, va])
    assert len(torch.unique(both)) == 60000  # disjoint
    assert torch.equal(both.sort().values, torch.arange(60000))  # complete
    # fraction form gives the same sizes
    tr2, va2 = split_indices(labels, 1 / 6, seed=0)
    assert (len(tr2), len(va2)) == (50000, 10000)


def test_split_is_seeded(train):
    labels = train[1]
    a = split_indices(labels, 10000, seed=1)
    b = split_indices(labels, 10000, seed=1)
    c = split_indices(labels, 10000, seed=2)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])
    # a random split, not the first or last 10,000
    assert not torch.equal(a[1], torch.arange(10000))
    assert not torch.equal(a[1], torch.arange(50000, 60000))


def test_stratified_split_keeps_class_proportions(train):
    labels = train[1]
    tr, va = split_indices(labels, 10000, seed=0, stratify=True)
    assert len(tr) == 50000 and len(va) == 10000
    assert torch.equal(torch.cat([tr, va]).sort().values, torch.arange(60000))
    val_counts = torch.bincount(labels[va], minlength=10)
    expected = torch.tensor(TRAIN_CLASS_COUNTS, dtype=torch.float64) / 6
    # largest-remainder quotas: each class within one sample of its exact share
    assert (val_counts.double() - expected).abs().max() < 1.0
    assert int(val_counts.sum()) == 10000
    # reproducible, and seed-dependent
    assert torch.equal(split_indices(labels, 10000, seed=0, stratify=True)[1], va)
    assert not torch.equal(split_indices(labels, 10000, seed=3, stratify=True)[1], va)


def test_unstratified_split_is_not_exactly_proportional(train):
    # Sanity check that the stratified test above is meaningful: a plain random split is off
    # by more than one sample in at least one class.
    labels = train[1]
    _, va = split_indices(labels, 10000, seed=0)
    val_counts = torch.bincount(labels[va], minlength=10).double()
    expected = torch.tensor(TRAIN_CLASS_COUNTS, dtype=torch.float64) / 6
    assert (val_counts - expected).abs().max() > 1.0


@pytest.mark.parametrize("val", [0, 60000, 0.0, 1.0, -5, 1.5])
def test_split_rejects_bad_sizes(train, val):
    with pytest.raises(DataError, match="validation"):
        split_indices(train[1], val)


# --- BatchLoader -------------------------------------------------------------------------------


def test_loader_len_and_batches(train):
    images, labels = train
    loader = BatchLoader(images, labels, batch_size=64, shuffle=True, seed=0)
    assert len(loader) == 938
    assert len(BatchLoader(images, labels, batch_size=64, drop_last=True)) == 937
    sizes = []
    for i, (x, y) in enumerate(loader):
        if i == 0:
            assert x.shape == (64, 1, 28, 28) and x.dtype == torch.float32
            assert y.shape == (64,) and y.dtype == torch.int64
        sizes.append(len(y))
    assert len(sizes) == 938
    assert sizes[:-1] == [64] * 937 and sizes[-1] == 60000 - 937 * 64 == 32


def test_loader_drop_last_iterates_937_full_batches(train, train_x):
    labels = train[1]
    loader = BatchLoader(train_x, labels, batch_size=64, shuffle=True, drop_last=True)
    sizes = [len(y) for _, y in loader]
    assert sizes == [64] * 937


def test_loader_yields_normalized_pairs_that_match(train):
    images, labels = train
    loader = BatchLoader(images, labels, batch_size=1000, shuffle=True, seed=5)
    x, y = next(iter(loader))
    order = loader.order(0)[:1000]
    assert loader.x.dtype == torch.uint8  # kept small; batches are normalized as drawn
    assert torch.equal(x, normalize(images[order]))  # by the very same arithmetic
    assert torch.equal(next(iter(BatchLoader(images, labels, 7)))[0], normalize(images[:7]))
    assert torch.equal(y, labels[order])


def _epoch_order(loader: BatchLoader) -> torch.Tensor:
    return torch.cat([y for _, y in loader])


def test_every_index_exactly_once_per_epoch(train_x):
    ids = torch.arange(60000)  # labels = sample ids, so a batch's y says which samples it holds
    loader = BatchLoader(train_x, ids, batch_size=64, shuffle=True, seed=0)
    assert loader.x.data_ptr() == train_x.data_ptr()  # float input is used in place
    first = _epoch_order(loader)
    second = _epoch_order(loader)
    for order in (first, second):
        assert len(order) == 60000
        assert torch.equal(order.sort().values, ids)
    assert not torch.equal(first, ids)  # shuffled
    assert not torch.equal(first, second)  # reshuffled every epoch


def test_drop_last_covers_all_but_the_remainder(train_x):
    ids = torch.arange(60000)
    loader = BatchLoader(train_x, ids, batch_size=64, shuffle=True, seed=0, drop_last=True)
    order = _epoch_order(loader)
    assert len(order) == 937 * 64
    assert len(torch.unique(order)) == len(order)


def test_same_seed_same_order_and_set_epoch(train_x):
    ids = torch.arange(60000)  # the order is one permutation per epoch, whatever the batch size
    a = BatchLoader(train_x, ids, batch_size=1000, shuffle=True, seed=7)
    b = BatchLoader(train_x, ids, batch_size=1000, shuffle=True, seed=7)
    c = BatchLoader(train_x, ids, batch_size=1000, shuffle=True, seed=8)
    a0, a1, a2 = _epoch_order(a), _epoch_order(a), _epoch_order(a)
    assert torch.equal(a0, _epoch_order(b))
    assert torch.equal(a1, _epoch_order(b))
    assert not torch.equal(a0, _epoch_order(c))
    # resuming: set_epoch picks the order of that epoch
    fresh = BatchLoader(train_x, ids, batch_size=1000, shuffle=True, seed=7)
    fresh.set_epoch(2)
    assert torch.equal(_epoch_order(fresh), a2)
    fresh.set_epoch(0)
    assert torch.equal(_epoch_order(fresh), a0)


def test_unshuffled_loader_is_in_order(test_split):
    images, labels = test_split
    loader = BatchLoader(images, labels, batch_size=1000)
    assert len(loader) == 10
    batches = list(loader)
    assert torch.equal(torch.cat([y for _, y in batches]), labels)
    torch.testing.assert_close(batches[3][0], normalize(images[3000:4000]))


def test_loader_rejects_bad_input(test_split):
    images, labels = test_split
    with pytest.raises(DataError, match="10000 images but 9999 labels"):
        BatchLoader(images, labels[:-1])
    with pytest.raises(DataError, match="batch size"):
        BatchLoader(images, labels, batch_size=0)


# --- MNISTDataset + torch DataLoader -----------------------------------------------------------


def test_dataset_with_torch_dataloader(test_split):
    images, labels = test_split
    ds = MNISTDataset(images, labels)
    assert len(ds) == 10000
    x0, y0 = ds[0]
    assert x0.shape == (1, 28, 28) and x0.dtype == torch.float32 and y0 == 7
    dl = torch.utils.data.DataLoader(ds, batch_size=500, shuffle=False)
    xs, ys = zip(*dl, strict=True)
    x, y = torch.cat(xs), torch.cat(ys)
    assert x.shape == (10000, 1, 28, 28) and x.dtype == torch.float32
    assert y.dtype == torch.int64 and torch.equal(y, labels)
    ours = BatchLoader(images, labels, batch_size=10000)
    bx, by = next(iter(ours))
    torch.testing.assert_close(x, bx, atol=1e-5, rtol=0)
    assert torch.equal(y, by)


def test_dataset_with_shuffling_dataloader_sees_every_sample(test_split):
    images, _ = test_split
    ds = MNISTDataset(images, torch.arange(10000))
    g = torch.Generator().manual_seed(0)
    dl = torch.utils.data.DataLoader(ds, batch_size=256, shuffle=True, generator=g)
    seen = torch.cat([y for _, y in dl])
    assert torch.equal(seen.sort().values, torch.arange(10000))
