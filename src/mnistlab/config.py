"""Training configuration: one dataclass whose defaults are the lab's recipe, plus named recipes.

Precedence: dataclass defaults < recipe < config file (`--config`) < explicit flags. The resolved
config is saved with a run.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import MnistlabError

OPTIMIZERS = ("adam", "adamw", "sgd", "rmsprop")
SCHEDULES = ("none", "step", "cosine", "onecycle")
DEVICES = ("auto", "cpu", "cuda", "mps")
AUGMENTATIONS = ("none", "affine")
AUTOCASTS = ("auto", "none", "bf16", "fp16")  # auto: mnistlab.hardware decides


@dataclass
class TrainConfig:
    recipe: str = "lab"
    model: str = "mlp"
    optimizer: str = "adam"
    lr: float = 0.001
    weight_decay: float = 0.0
    momentum: float = 0.0  # sgd and rmsprop
    nesterov: bool = False  # sgd
    schedule: str = "none"
    step_size: int = 1  # epochs between decays, for the step schedule
    gamma: float = 0.7  # decay factor, for the step schedule
    label_smoothing: float = 0.0
    grad_clip: float = 0.0  # max gradient norm; 0 turns clipping off
    batch_size: int = 64
    eval_batch_size: int = 1000
    epochs: int = 5
    seed: int = 0
    device: str = "auto"
    threads: int = 0  # torch threads; 0: one for small models, else one per idle core
    train_limit: int = 0  # train on the first N training images only (quick tests); 0: all
    val_split: float = 0.0  # fraction of the training set held out; 0 turns validation off
    early_stop: int = 0  # patience in epochs on validation loss; 0 turns it off
    log_every: int = 0  # steps between the lab's progress lines; 0 means 7 lines an epoch
    augment: str = "none"  # batched augmentation of training batches: none or affine
    aug_degrees: float = 10.0  # affine: max rotation
    aug_scale: float = 0.1  # affine: max relative zoom in or out
    aug_shear: float = 0.0  # affine: max shear in degrees
    aug_translate: float = 0.1  # affine: max shift as a fraction of the image size
    # How the run executes; auto: what mnistlab.hardware measured to pay on this machine.
    autocast: str = "auto"  # none (float32), bf16 or fp16: the training forward's precision
    channels_last: bool | None = None  # NHWC memory layout for the model; None: auto
    ema: float = 0.0  # decay of a moving average of the weights, evaluated and kept; 0: off
    mlp_step: bool = True  # mlp, logreg: gradients by mnistlab.mlpstep's written-out backward
    eval_test: bool = True  # test set after every epoch; off in sweeps (they choose on validation)
    model_args: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> TrainConfig:
        from .models import MODELS

        def bad(msg: str) -> MnistlabError:
            return MnistlabError(msg)

        if self.model not in MODELS:
            raise bad(f"unknown model {self.model!r}; choose one of: {', '.join(MODELS)}")
        if self.optimizer not in OPTIMIZERS:
            raise bad(
                f"unknown optimizer {self.optimizer!r}; choose one of: {', '.join(OPTIMIZERS)}"
            )
        if self.augment not in AUGMENTATIONS:
            raise bad(
                f"unknown augmentation {self.augment!r}; choose one of: {', '.join(AUGMENTATIONS)}"
            )
        if self.autocast not in AUTOCASTS:
            raise bad(f"unknown autocast {self.autocast!r}; choose one of: {', '.join(AUTOCASTS)}")
        if self.schedule not in SCHEDULES:
            raise bad(f"unknown schedule {self.schedule!r}; choose one of: {', '.join(SCHEDULES)}")
        if self.device not in DEVICES:
            raise bad(f"unknown device {self.device!r}; choose one of: {', '.join(DEVICES)}")
        for name in ("epochs", "batch_size", "eval_batch_size", "step_size"):
            if getattr(self, name) <= 0:
                raise bad(f"{name.replace('_', ' ')} must be positive, got {getattr(self, name)}")
        if not 0 < self.lr < math.inf:
            raise bad(f"learning rate must be a positive number, got {self.lr}")
        if self.val_split and not 0.0 < self.val_split < 1.0:
            raise bad(
                f"validation fraction must be between 0 and 1 (exclusive), got {self.val_split}"
            )
        if min(self.early_stop, self.log_every, self.threads, self.train_limit) < 0:
            raise bad(
                "early stop patience, log interval, threads and train limit must not be negative"
            )
        if self.early_stop and not self.val_split:
            raise bad("--early-stop needs a validation split: add --val-split FRACTION")
        if not 0.0 <= self.ema < 1.0:
            raise bad(f"EMA decay must be in [0, 1), e.g. 0.999; got {self.ema}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise bad(f"label smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.weight_decay < 0 or self.grad_clip < 0 or self.momentum < 0:
            raise bad("weight decay, gradient clipping and momentum must not be negative")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise MnistlabError(f"unknown config keys: {', '.join(sorted(unknown))}")
        return cls(**d)


@dataclass(frozen=True)
class Recipe:
    name: str
    description: str
    overrides: dict[str, Any]


RECIPES: dict[str, Recipe] = {}


def register_recipe(name: str, description: str, **overrides: Any) -> None:
    RECIPES[name] = Recipe(name, description, overrides)


register_recipe("lab", "The lab: SimpleMNISTDNN, Adam 0.001, batch 64, 5 epochs.")
register_recipe(
    "logreg",
    "The lab's logistic regression: Linear(784, 10) with plain SGD at 0.01.",
    model="logreg",
    optimizer="sgd",
    lr=0.01,  # 0.1 oscillates (89.96-92.17% over seeds 0-3); 0.01 climbs steadily to ~92%
    epochs=5,
)
register_recipe(
    "advanced",
    "The lab's Advanced model: mlp-bn, Adam 0.001 with weight decay 1e-5, 10 epochs.",
    model="mlp-bn",
    weight_decay=1e-5,
    epochs=10,
)
register_recipe(
    "cnn",
    "The PyTorch MNIST example convnet, Adam one-cycle to 0.003, batch 64, 3 epochs.",
    model="cnn",
    # Seeds 1, 2 after 3 epochs: constant 0.001 98.82/98.77%, cosine 98.95/98.97%, this 99.10/99.10
    schedule="onecycle",
    lr=0.003,
    epochs=3,
)
register_recipe(
    "robust",
    "The bundled model: compact convnet, affine augmentation (±15°, ±20% zoom, ±10° shear, "
    "±10% shift), Adam one-cycle 0.005, batch 128, 15 epochs, 10% held out for validation.",
    model="convnet",
    augment="affine",
    aug_degrees=15.0,
    aug_scale=0.2,
    aug_shear=10.0,
    schedule="onecycle",
    lr=0.005,
    batch_size=128,
    epochs=15,
    val_split=0.1,
)
register_recipe(
    "fast",
    "Time to 99%: fastcnn, one epoch, AdamW one-cycle 0.01, batch 128, label smoothing 0.1.",
    model="fastcnn",
    optimizer="adamw",
    lr=0.01,
    weight_decay=1e-4,
    schedule="onecycle",
    label_smoothing=0.1,
    batch_size=128,
    epochs=1,
)
register_recipe(
    "best",
    "Best accuracy: vgg5, affine augmentation, AdamW one-cycle 0.003, batch 128, label smoothing "
    "0.1, EMA 0.999, 15 epochs, 10% held out for validation (about 14 minutes on one core).",
    model="vgg5",
    optimizer="adamw",
    lr=0.003,
    weight_decay=5e-4,
    schedule="onecycle",
    label_smoothing=0.1,
    batch_size=128,
    epochs=15,  # validation accuracy levels off after about 10 of 20 epochs
    augment="affine",
    ema=0.999,
    val_split=0.1,
)


def resolve_config(
    recipe: str | None = None,
    *,
    config: Mapping[str, Any] | None = None,
    model_args: Mapping[str, Any] | None = None,
    **flags: Any,
) -> TrainConfig:
    """Defaults, then the recipe's values, then `config` (a config file's keys), then every flag
    that is not None. `model_args` are merged key by key over those of the recipe and the file.

    The recipe is `recipe`, else the file's "recipe", else the lab's.
    """
    config = dict(config or {})
    recipe = recipe or config.get("recipe") or "lab"
    if recipe not in RECIPES:
        raise MnistlabError(f"unknown recipe {recipe!r}; choose one of: {', '.join(RECIPES)}")
    values: dict[str, Any] = {**RECIPES[recipe].overrides, **config, "recipe": recipe}
    values.update({k: v for k, v in flags.items() if v is not None})
    if model_args:
        values["model_args"] = {**(values.get("model_args") or {}), **model_args}
    return TrainConfig.from_dict(values).validate()


CONFIG_SUFFIXES = (".toml", ".json")


def toml_module() -> Any:
    """The standard library's TOML reader (Python 3.11+), or its backport `tomli` on 3.10."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    return tomllib


def read_config_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The TrainConfig keys of a TOML or JSON file (`mnistlab train --config FILE`), checked for
    unknown keys; `mnistlab sweep best` writes such a file."""
    tomllib = toml_module()
    path = Path(path)
    if path.suffix not in CONFIG_SUFFIXES:
        raise MnistlabError(f"--config {path}: give a .toml or .json file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise MnistlabError(f"--config {path}: cannot read it ({getattr(e, 'strerror', None) or e})"
                            ) from None
    try:
        values = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as e:
        raise MnistlabError(f"--config {path}: not valid {path.suffix[1:].upper()} ({e})") from None
    if not isinstance(values, dict):
        raise MnistlabError(f"--config {path}: expected an object of TrainConfig keys")
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise MnistlabError(
            f"--config {path}: unknown key{'s' if len(unknown) > 1 else ''} "
            f"{', '.join(map(repr, unknown))}; the keys are TrainConfig's: "
            f"{', '.join(sorted(names))}"
        )
    return values


def parse_model_args(items: Iterable[str]) -> dict[str, Any]:
    """`--model-arg KEY=VALUE` pairs: the value is read as JSON (256, 0.3, true, [16, 32, 64])
    where it parses, else kept as a string."""
    args: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise MnistlabError(f"--model-arg {item!r}: write it as KEY=VALUE, e.g. hidden=256")
        try:
            args[key] = json.loads(text)
        except json.JSONDecodeError:
            args[key] = text
    return args
