"""The lab-style reference pipeline every speed figure is compared with.

What the lab does, without torchvision: a per-sample `Dataset` that builds a PIL image from the
uint8 array, turns it into a float tensor scaled by 1/255 and normalizes it (torchvision's
`ToTensor` + `Normalize`, doing per sample what torchvision 0.28's do), `DataLoader(batch_size=64,
shuffle=True)` and a test `DataLoader(batch_size=1000)`, and the lab's own `train_epoch` /
`evaluate` loops. It deliberately imports nothing from mnistlab.
"""

from __future__ import annotations

import gzip
import time
from pathlib import Path
from types import FunctionType

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset

from mnistlab.models import MNISTConvNet, SimpleMNISTDNN

MEAN, STD = 0.1307, 0.3081
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def read_idx(path: Path) -> torch.Tensor:
    """An IDX file as a uint8 tensor, the way torchvision's MNIST reads its raw files."""
    data = path.read_bytes()
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    ndim = data[3]
    shape = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return torch.frombuffer(bytearray(data[4 + 4 * ndim :]), dtype=torch.uint8).view(*shape)


def load_split(raw: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 images [N, 28, 28], int64 labels [N]) from `<raw>/<file>` or `<raw>/<file>.gz`."""
    out = []
    for name in FILES[split]:
        path = raw / name if (raw / name).is_file() else raw / f"{name}.gz"
        out.append(read_idx(path))
    return out[0], out[1].long()


def _log_api_usage_once(obj) -> None:
    """torchvision calls this from every transform it runs (a no-op logger unless one is set)."""
    name = obj.__name__ if isinstance(obj, FunctionType) else type(obj).__name__
    torch._C._log_api_usage_once(f"torchvision.internal.{obj.__module__}.{name}")


def to_tensor(pic: Image.Image) -> torch.Tensor:
    """torchvision's `F.to_tensor` on a PIL image: HWC uint8 → CHW float in [0, 1]."""
    if not torch.jit.is_scripting() and not torch.jit.is_tracing():
        _log_api_usage_once(to_tensor)
    if not isinstance(pic, (Image.Image, np.ndarray)):
        raise TypeError(f"pic should be PIL Image or ndarray. Got {type(pic)}")
    default_float_dtype = torch.get_default_dtype()
    mode_to_nptype = {"I": np.int32, "I;16": np.int16, "F": np.float32}
    img = torch.from_numpy(np.array(pic, mode_to_nptype.get(pic.mode, np.uint8), copy=True))
    if pic.mode == "1":
        img = 255 * img
    img = img.view(pic.size[1], pic.size[0], len(pic.getbands()))
    img = img.permute((2, 0, 1)).contiguous()
    if isinstance(img, torch.ByteTensor):
        return img.to(dtype=default_float_dtype).div(255)
    return img


def normalize(tensor: torch.Tensor, mean: list[float], std: list[float]) -> torch.Tensor:
    """torchvision's `F.normalize` (not in place, its default): checks, clone, sub_, div_."""
    if not torch.jit.is_scripting() and not torch.jit.is_tracing():
        _log_api_usage_once(normalize)
    if not isinstance(tensor, torch.Tensor) or tensor.ndim < 2:
        raise TypeError("Tensor is not a torch image.")
    if not tensor.is_floating_point():
        raise TypeError(f"Input tensor should be a float tensor. Got {tensor.dtype}.")
    if tensor.ndim < 3:
        raise ValueError(f"Expected a tensor image of size (..., C, H, W), got {tensor.size()}")
    tensor = tensor.clone()
    mean_t = torch.as_tensor(mean, dtype=tensor.dtype, device=tensor.device)
    std_t = torch.as_tensor(std, dtype=tensor.dtype, device=tensor.device)
    if (std_t == 0).any():
        raise ValueError("std evaluated to zero, leading to division by zero.")
    if mean_t.ndim == 1:
        mean_t = mean_t.view(-1, 1, 1)
    if std_t.ndim == 1:
        std_t = std_t.view(-1, 1, 1)
    return tensor.sub_(mean_t).div_(std_t)


class ToTensor:
    def __init__(self) -> None:
        _log_api_usage_once(self)

    def __call__(self, pic: Image.Image) -> torch.Tensor:
        return to_tensor(pic)


class Normalize(nn.Module):
    def __init__(self, mean: list[float], std: list[float]) -> None:
        super().__init__()
        _log_api_usage_once(self)
        self.mean, self.std = mean, std

    def forward(self, tensor: torch.Tensor) -> torch.Tensor:
        return normalize(tensor, self.mean, self.std)


class Compose:
    def __init__(self, transforms: list) -> None:
        _log_api_usage_once(self)
        self.transforms = transforms

    def __call__(self, img):
        for t in self.transforms:
            img = t(img)
        return img


def _image_from_array(obj: np.ndarray, mode: str) -> Image.Image:
    """torchvision's `_Image_fromarray` for Pillow >= 11.3 (where `fromarray(mode=)` is
    deprecated): the array's buffer read in the given mode."""
    shape = obj.__array_interface__["shape"]
    size = (1 if len(shape) == 1 else shape[1], shape[0])
    return Image.frombuffer(mode, size, obj, "raw", mode, 0, 1)


class LabMNIST(Dataset):
    """torchvision's `MNIST.__getitem__` with `Compose([ToTensor(), Normalize(...)])`.

    The transforms do per sample what torchvision 0.28's do (argument checks, usage logging, a
    PIL image, a copy to a tensor, a clone before normalizing), so the reference costs what the
    lab's pipeline costs without importing torchvision.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.data, self.targets = images, labels
        self.transform = Compose([ToTensor(), Normalize((MEAN,), (STD,))])

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        img, target = self.data[index], int(self.targets[index])
        img = _image_from_array(img.numpy(), mode="L")
        return self.transform(img), target


# The same classes mnistlab trains: the reference differs in its pipeline only.
MODELS = {"mlp": SimpleMNISTDNN, "cnn": MNISTConvNet}


def train_epoch(model, loader, optimizer, criterion, device, log_every=134, verbose=False):
    """The lab's training loop: running loss and accuracy, a progress line every 134 steps."""
    model.train()
    running_loss, correct, total = 0.0, 0, 0
    for step, (images, labels) in enumerate(loader, start=1):
        images, labels = images.to(device), labels.to(device)
        optimizer.zero_grad()
        outputs = model(images)
        loss = criterion(outputs, labels)
        loss.backward()
        optimizer.step()
        running_loss += loss.item() * labels.size(0)
        _, predicted = outputs.max(1)
        total += labels.size(0)
        correct += predicted.eq(labels).sum().item()
        if step % log_every == 0:
            line = (
                f"Step {step}/{len(loader)} - Loss: {running_loss / total:.3f} | "
                f"Acc: {100.0 * correct / total:.2f}%"
            )
            if verbose:
                print(line)
            running_loss, correct, total = 0.0, 0, 0


def evaluate(model, loader, device) -> float:
    """The lab's evaluation: eval mode, no gradients, accuracy in %."""
    model.eval()
    correct, total = 0, 0
    with torch.no_grad():
        for images, labels in loader:
            images, labels = images.to(device), labels.to(device)
            outputs = model(images)
            _, predicted = outputs.max(1)
            total += labels.size(0)
            correct += predicted.eq(labels).sum().item()
    return 100.0 * correct / total


def run(
    raw: Path,
    model_name: str = "mlp",
    epochs: int = 5,
    seed: int = 0,
    target: float | None = None,
    limit: int = 0,
    verbose: bool = False,
) -> dict:
    """Train the lab way; returns per-epoch test accuracy and seconds since the call.

    With `target`, stop after the first epoch whose test accuracy reaches it (time to target).
    `limit` trains and tests on the first N images only (smoke tests).
    """
    start = time.perf_counter()
    device = torch.device("cpu")
    torch.manual_seed(seed)
    train_x, train_y = load_split(raw, "train")
    test_x, test_y = load_split(raw, "test")
    if limit:
        train_x, train_y = train_x[:limit], train_y[:limit]
        test_x, test_y = test_x[:limit], test_y[:limit]
    train_loader = DataLoader(LabMNIST(train_x, train_y), batch_size=64, shuffle=True)
    test_loader = DataLoader(LabMNIST(test_x, test_y), batch_size=1000)
    model = MODELS[model_name]().to(device)
    criterion = nn.CrossEntropyLoss()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.001)
    accs, times = [], []
    for _ in range(epochs):
        train_epoch(model, train_loader, optimizer, criterion, device, verbose=verbose)
        accs.append(evaluate(model, test_loader, device))
        times.append(time.perf_counter() - start)
        if verbose:
            print(f"epoch {len(accs)}: test acc {accs[-1]:.2f}% at {times[-1]:.1f}s")
        if target is not None and accs[-1] >= target:
            break
    reached = target is None or accs[-1] >= target
    return {
        "model": model_name,
        "test_acc": accs[-1],
        "accs": accs,
        "epoch_seconds": times,
        "epochs": len(accs),
        "seconds": times[-1],
        "reached": reached,
        "threads": torch.get_num_threads(),
    }


if __name__ == "__main__":
    import argparse
    import json
    import os

    p = argparse.ArgumentParser(description="Run the lab-style reference pipeline once.")
    p.add_argument("--model", default="mlp", choices=list(MODELS))
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--target", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit", type=int, default=0)
    p.add_argument("--raw", help="Folder of the IDX files. Default: $MNISTLAB_DATA/MNIST/raw.")
    p.add_argument("--verbose", action="store_true")
    a = p.parse_args()
    raw = Path(a.raw) if a.raw else Path(os.environ.get("MNISTLAB_DATA", "data")) / "MNIST" / "raw"
    print(json.dumps(run(raw, a.model, a.epochs, a.seed, a.target, a.limit, a.verbose)))
