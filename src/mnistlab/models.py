"""Models, registered by name: `create_model("mlp")`. Adding a model is one decorated class here.

Every model takes float32 [B, 1, 28, 28] and returns 10 raw scores (logits) per image.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .errors import MnistlabError


@dataclass(frozen=True)
class ModelEntry:
    name: str
    cls: type[nn.Module]
    description: str


MODELS: dict[str, ModelEntry] = {}


def register(name: str, description: str) -> Callable[[type[nn.Module]], type[nn.Module]]:
    def wrap(cls: type[nn.Module]) -> type[nn.Module]:
        MODELS[name] = ModelEntry(name, cls, description)
        return cls

    return wrap


def model_names() -> list[str]:
    return list(MODELS)


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """Build a registered model by name, e.g. `create_model("mlp")`."""
    try:
        entry = MODELS[name]
    except KeyError:
        raise MnistlabError(f"unknown model {name!r}; choose one of: {', '.join(MODELS)}") from None
    try:
        return entry.cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise MnistlabError(f"bad arguments for model {name!r}: {e}") from None


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@register("logreg", "Logistic regression: flatten, one Linear(784, 10).")
class LogisticRegression(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.flatten = nn.Flatten()
        self.linear = nn.Linear(28 * 28, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.flatten(x))

    def linear_stack(self) -> list[nn.Linear]:
        """Flatten → Linear: trainable by `mnistlab.mlpstep` without autograd."""
        return [self.linear]


@register("mlp", "The lab's SimpleMNISTDNN: 784 → 128 → ReLU → 10 (hidden, depth, dropout).")
class SimpleMNISTDNN(nn.Module):
    """Flatten → (Linear → ReLU [→ Dropout]) × depth → Linear(hidden, 10).

    The defaults are the lab's model (101,770 parameters); layers are named fc1, fc2, ... so its
    weights keep their names whatever the depth.
    """

    def __init__(self, hidden: int = 128, depth: int = 1, dropout: float = 0.0) -> None:
        super().__init__()
        if isinstance(hidden, bool) or not isinstance(hidden, int) or hidden < 1:
            raise ValueError(f"hidden must be a positive integer, got {hidden!r}")
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
            raise ValueError(f"depth must be a positive integer, got {depth!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        self.depth, self.dropout = depth, float(dropout)
        self.flatten = nn.Flatten()
        widths = [28 * 28] + [hidden] * depth + [10]
        for i, (n_in, n_out) in enumerate(itertools.pairwise(widths), start=1):
            setattr(self, f"fc{i}", nn.Linear(n_in, n_out))
            if i == 1:  # registered here so the modules list in the lab's order
                self.relu = nn.ReLU()
                self.drop = nn.Dropout(dropout) if dropout else None

    def linears(self) -> list[nn.Linear]:
        return [getattr(self, f"fc{i}") for i in range(1, self.depth + 2)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        *hidden, last = self.linears()
        x = self.flatten(x)
        for fc in hidden:
            x = self.relu(fc(x))
            if self.drop is not None:
                x = self.drop(x)
        return last(x)

    def linear_stack(self) -> list[nn.Linear] | None:
        """Flatten → (Linear → ReLU)* → Linear, trainable by `mnistlab.mlpstep` without autograd;
        None while dropout is active (in training mode with dropout > 0)."""
        if self.drop is not None and self.training:
            return None
        return self.linears()


def _mlp_stack(batchnorm: bool, dropout: float) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Flatten()]
    widths = [28 * 28, 256, 128, 64]
    for i, (n_in, n_out) in enumerate(itertools.pairwise(widths)):
        layers.append(nn.Linear(n_in, n_out))
        if batchnorm:
            layers.append(nn.BatchNorm1d(n_out))
        layers.append(nn.ReLU())
        if i < 2:  # the lab drops out after the first two hidden layers only
            layers.append(nn.Dropout(dropout))
    layers.append(nn.Linear(widths[-1], 10))
    return nn.Sequential(*layers)


@register("mlp-dropout", "The lab's Improved model: 784-256-128-64-10, ReLU, Dropout(0.3).")
class ImprovedMNISTDNN(nn.Module):
    def __init__(self, dropout: float = 0.3) -> None:
        super().__init__()
        self.net = _mlp_stack(batchnorm=False, dropout=dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@register("mlp-bn", "The lab's Advanced model: the Improved model with BatchNorm1d before ReLU.")
class AdvancedMNISTDNN(nn.Module):
    def __init__(self, dropout: float = 0.3) -> None:
        super().__init__()
        self.net = _mlp_stack(batchnorm=True, dropout=dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@register("cnn", "The PyTorch MNIST example convnet: conv32, conv64, max-pool, fc128, dropout.")
class MNISTConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, 1)
        self.conv2 = nn.Conv2d(32, 64, 3, 1)
        self.dropout1 = nn.Dropout(0.25)
        self.dropout2 = nn.Dropout(0.5)
        self.fc1 = nn.Linear(9216, 128)
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        x = torch.flatten(self.dropout1(torch.max_pool2d(x, 2)), 1)
        x = self.dropout2(torch.relu(self.fc1(x)))
        return self.fc2(x)


@register("convnet", "Compact LeNet-style convnet: conv5 16, conv5 32 (BatchNorm, pool), fc128.")
class CompactConvNet(nn.Module):
    """A fifth of `cnn`'s parameters and a quarter of its compute; the bundled model."""

    def __init__(self, dropout: float = 0.3) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 5, padding=2, bias=False),  # BatchNorm supplies the bias
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 5, padding=2, bias=False),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(32 * 7 * 7, 128),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(128, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def _conv_pool_bn(n_in: int, n_out: int) -> list[nn.Module]:
    # Pool before BatchNorm and ReLU (ReLU commutes with max-pooling): those two memory-bound
    # passes then touch a quarter of the pixels.
    return [
        nn.Conv2d(n_in, n_out, 3, padding=1, bias=False),
        nn.MaxPool2d(2),
        nn.BatchNorm2d(n_out),
        nn.ReLU(inplace=True),
    ]


@register("fastcnn", "Small fast convnet: 5×5 stride-2 stem, two conv-pool-BN blocks, linear.")
class FastCNN(nn.Module):
    """Made for time to 99% on a CPU: about 29k parameters and 1.4M multiply-adds an image.

    The stride-2 stem halves the resolution at once; the 2-pixel border it crops holds 0.2% of
    the ink of MNIST's training images.
    """

    def __init__(self, widths: tuple[int, int, int] = (16, 32, 64), crop: int = 2) -> None:
        super().__init__()
        w1, w2, w3 = widths
        self.crop = crop
        size = (28 - 2 * crop + 1) // 2 // 2 // 2  # after the stem and two pools
        self.features = nn.Sequential(
            nn.Conv2d(1, w1, 5, stride=2, padding=2, bias=False),  # BatchNorm supplies the bias
            nn.BatchNorm2d(w1),
            nn.ReLU(inplace=True),
            *_conv_pool_bn(w1, w2),
            *_conv_pool_bn(w2, w3),
        )
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(w3 * size * size, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.crop:
            c = self.crop
            x = x[:, :, c:-c, c:-c]
        return self.classifier(self.features(x))


def _conv_bn(n_in: int, n_out: int) -> list[nn.Module]:
    return [nn.Conv2d(n_in, n_out, 3, padding=1, bias=False), nn.BatchNorm2d(n_out),
            nn.ReLU(inplace=True)]


@register("vgg5", "VGG-style convnet: five 3×3 conv-BN-ReLU layers, 32-64-64-128-128, linear.")
class VGG5(nn.Module):
    """The `best` recipe's model: 289k parameters, 22M multiply-adds an image.

    Resolution halves after the first, third and fifth convolution (28 → 14 → 7 → 3).
    """

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        w = width
        self.features = nn.Sequential(
            *_conv_pool_bn(1, w),
            *_conv_bn(w, 2 * w),
            *_conv_pool_bn(2 * w, 2 * w),
            *_conv_bn(2 * w, 4 * w),
            *_conv_pool_bn(4 * w, 4 * w),
        )
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(4 * w * 3 * 3, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))
