"""Inside the model: its first layer as images, attributions for one image, the embedding map.

Every function takes images as float32 [N, 28, 28] in [0, 1] (white ink on black, as
`Predictor.preprocess` makes them and as uint8 MNIST / 255 is) and normalizes them itself, so a
heat map lines up with the picture a person sees.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .catalog import MNIST
from .errors import MnistlabError

IG_STEPS = 16  # midpoint steps: the sum misses the logit gap by 0.7% (median; 32: 0.4%)
CHUNK = 1024  # images × steps per forward pass: bounds memory for long lists


def as_images(x: torch.Tensor | np.ndarray) -> torch.Tensor:
    """float32 [N, 28, 28] in [0, 1]: uint8 is scaled by 1/255, [28, 28] and [N, 1, 28, 28]
    are reshaped."""
    t = torch.as_tensor(x)
    if t.dtype == torch.uint8:
        t = t.float() / 255.0
    t = t.float()
    if t.ndim == 2:
        t = t.unsqueeze(0)
    if t.ndim == 4 and t.shape[1] == 1:
        t = t.squeeze(1)
    if t.ndim != 3 or tuple(t.shape[1:]) != (28, 28):
        raise MnistlabError(f"expected images of shape [N, 28, 28], got {list(t.shape)}")
    return t


def normalize(x: torch.Tensor) -> torch.Tensor:
    """[N, 28, 28] in [0, 1] → the model's input [N, 1, 28, 28] (MNIST mean and std)."""
    return ((x - MNIST.mean) / MNIST.std).unsqueeze(1)


# --- the first layer --------------------------------------------------------------------------


@dataclass
class FirstLayer:
    """The weights a model applies to the pixels, one image per unit or filter."""

    kind: str  # "linear": one 28×28 template per unit; "conv": one k×k filter per channel
    weights: torch.Tensor  # [units, 28, 28] or [channels, k, k]
    module: nn.Module

    @property
    def count(self) -> int:
        return int(self.weights.shape[0])


def first_layer(model: nn.Module) -> FirstLayer:
    """The first module that reads the pixels: a Linear over 784 inputs, or a one-channel Conv2d.

    For logistic regression these are its ten class templates; for an MLP, its hidden units.
    """
    for module in model.modules():
        if isinstance(module, nn.Linear) and module.in_features == 28 * 28:
            w = module.weight.detach().float().cpu().reshape(-1, 28, 28)
            return FirstLayer("linear", w, module)
        if isinstance(module, nn.Conv2d) and module.in_channels == 1:
            w = module.weight.detach().float().cpu()[:, 0]
            return FirstLayer("conv", w, module)
    raise MnistlabError(f"{type(model).__name__} has no layer that reads the 28×28 pixels")


@torch.no_grad()
def feature_maps(model: nn.Module, image: torch.Tensor) -> torch.Tensor:
    """What a convnet's first convolution answers to one image: [channels, h, w], after its
    BatchNorm and ReLU where the model has them as modules (ReLU applied otherwise)."""
    layer = first_layer(model)
    if layer.kind != "conv":
        raise MnistlabError(f"{type(model).__name__} has no convolution: no feature maps")
    modules = list(model.modules())
    start = modules.index(layer.module)
    tap, relu = layer.module, False
    for m in modules[start + 1 :]:  # module order is execution order in these Sequentials
        if isinstance(m, nn.BatchNorm2d | nn.ReLU):
            tap, relu = m, relu or isinstance(m, nn.ReLU)
        else:
            break
    out: list[torch.Tensor] = []
    handle = tap.register_forward_hook(_only_here(lambda output: out.append(output.detach())))
    was_training = model.training
    try:
        model.eval()
        model(normalize(as_images(image)[:1]).to(_device(model)))
    finally:
        handle.remove()
        model.train(was_training)
    maps = out[0][0].float().cpu()
    return maps if relu else maps.clamp(min=0)


def _only_here(record: Callable[..., None], inputs: bool = False) -> Callable[..., None]:
    """A forward hook that records only this thread's calls: a served model is shared by
    threads, and another request's forward pass must not land in this one's list."""
    me = threading.get_ident()

    def hook(module: nn.Module, inp: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        if threading.get_ident() == me:
            record(output, inp) if inputs else record(output)

    return hook


# --- attributions -----------------------------------------------------------------------------


@dataclass
class Explanation:
    """Integrated gradients of each image's target logit, with the black image as baseline."""

    attributions: torch.Tensor  # float32 [N, 28, 28]; sums to logit(x) − logit(black)
    probabilities: torch.Tensor  # float32 [N, 10], of the images as given
    labels: torch.Tensor  # int64 [N]: the predicted digit
    targets: torch.Tensor  # int64 [N]: the digit explained (the prediction unless given)


def integrated_gradients(
    model: nn.Module,
    images: torch.Tensor | np.ndarray,
    targets: torch.Tensor | None = None,
    steps: int = IG_STEPS,
) -> Explanation:
    """Integrated gradients (Sundararajan et al., 2017) for a batch of images.

    The baseline is the all-black image, MNIST's background: a pixel without ink gets exactly 0,
    and each image's attributions add up to its target logit minus the black image's. The path
    integral is a midpoint sum over `steps` points, evaluated as one batch of images × steps
    (chunked to bound memory).
    """
    if steps < 1:
        raise MnistlabError(f"integrated gradients needs at least 1 step, got {steps}")
    x = as_images(images)
    device = _device(model)
    x = x.to(device)
    n = x.shape[0]
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            logits = _forward(model, x) if n else torch.empty(0, 10, device=device)
        probs = logits.float().softmax(1)
        labels = logits.argmax(1)
        tgt = labels if targets is None else torch.as_tensor(targets, device=device).long()
        alphas = (torch.arange(steps, device=device, dtype=torch.float32) + 0.5) / steps
        grads = torch.zeros_like(x)
        per = max(1, CHUNK // steps)  # images per pass
        for s in range(0, n, per):
            xs, ts = x[s : s + per], tgt[s : s + per]
            # [steps, m, 28, 28]: every point of every image's path, one batch
            path = (alphas.view(-1, 1, 1, 1) * xs.unsqueeze(0)).reshape(-1, 28, 28)
            path.requires_grad_(True)
            out = _forward(model, path).float()
            picked = out.gather(1, ts.repeat(steps).unsqueeze(1)).sum()
            (g,) = torch.autograd.grad(picked, path)
            grads[s : s + per] = g.view(steps, -1, 28, 28).mean(0)
    finally:
        model.train(was_training)
    attributions = (x * grads).detach()  # (x − baseline) · mean gradient; baseline 0
    return Explanation(attributions.cpu(), probs.cpu(), labels.cpu(), tgt.cpu())


def _forward(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(normalize(x))


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters(), torch.empty(0)).device


# --- faithfulness checks ----------------------------------------------------------------------

INK = 0.1  # a pixel with at least this much ink (of 1.0) counts as ink in the checks below


@dataclass
class Faithfulness:
    """Per image: how much removing pixels lowers the explained digit's log-probability."""

    drop_top: torch.Tensor  # [N]: removing the most-attributed 10% of the ink pixels
    drop_random: torch.Tensor  # [N]: removing as many random ink pixels
    near_ink: torch.Tensor  # [N]: share of the positive attribution within `radius` px of ink

    @property
    def top_beats_random(self) -> float:
        """Fraction of images where the top pixels mattered more than random ones."""
        return float((self.drop_top > self.drop_random).float().mean())

    @property
    def near_ink_share(self) -> float:
        """Of all the positive attribution, the share within `radius` px of ink."""
        return float(self.near_ink.mean())


@torch.no_grad()
def faithfulness(
    model: nn.Module,
    images: torch.Tensor | np.ndarray,
    explanation: Explanation,
    fraction: float = 0.1,
    radius: int = 2,
    seed: int = 0,
) -> Faithfulness:
    """The deletion test and the locality test of an explanation.

    Per image, k = `fraction` of its ink pixels (at least one) are set to black: once the k with
    the largest attribution, once k chosen at random among the ink pixels. The drop is measured
    in log-probability of the explained digit (the same order as the probability, without float32
    saturating at 1.0 for confident digits).
    """
    x = as_images(images).cpu()
    a = explanation.attributions.cpu()
    tgt = explanation.targets.cpu()
    n = x.shape[0]
    flat, attr = x.reshape(n, -1), a.reshape(n, -1)
    ink = flat >= INK
    counts = ink.sum(1)
    k = (counts.float() * fraction).ceil().clamp(min=1).long()
    gen = torch.Generator().manual_seed(seed)
    # Random ranks restricted to ink pixels: non-ink pixels sort last.
    noise = torch.rand(flat.shape, generator=gen).masked_fill(~ink, -1.0)
    by_attr = attr.masked_fill(~ink, -torch.inf)
    rank = torch.arange(flat.shape[1]).unsqueeze(0)
    top = torch.zeros_like(ink).scatter_(1, by_attr.argsort(1, descending=True), rank < k[:, None])
    rnd = torch.zeros_like(ink).scatter_(1, noise.argsort(1, descending=True), rank < k[:, None])

    def logp(batch: torch.Tensor) -> torch.Tensor:
        out = []
        for s in range(0, n, CHUNK):
            xs = batch[s : s + CHUNK].reshape(-1, 28, 28).to(_device(model))
            lp = F.log_softmax(_forward(model, xs).double(), 1).cpu()
            out.append(lp.gather(1, tgt[s : s + CHUNK, None]).squeeze(1))
        return torch.cat(out)

    model.eval()
    base = logp(flat)
    drop_top = base - logp(flat.masked_fill(top, 0.0))
    drop_random = base - logp(flat.masked_fill(rnd, 0.0))
    near = dilate(x >= INK, radius).reshape(n, -1)
    pos = attr.clamp(min=0)
    total = pos.sum(1)
    share = torch.where(total > 0, (pos * near).sum(1) / total.clamp(min=1e-30), 1.0)
    return Faithfulness(drop_top.float(), drop_random.float(), share)


def dilate(mask: torch.Tensor, radius: int) -> torch.Tensor:
    """A boolean [N, 28, 28] mask grown by `radius` pixels (a square neighbourhood)."""
    if radius <= 0:
        return mask.clone()
    size = 2 * radius + 1
    grown = F.max_pool2d(mask.float().unsqueeze(1), size, stride=1, padding=radius)
    return grown.squeeze(1) > 0


# --- the embedding map ------------------------------------------------------------------------


def penultimate_layer(model: nn.Module) -> nn.Linear:
    """The model's last Linear: its input is the feature vector the classifier reads."""
    last = None
    for module in model.modules():
        if isinstance(module, nn.Linear):
            last = module
    if last is None:
        raise MnistlabError(f"{type(model).__name__} has no Linear layer to read features from")
    return last


@torch.no_grad()
def penultimate_features(
    model: nn.Module, images: torch.Tensor | np.ndarray, batch_size: int = 1000
) -> tuple[torch.Tensor, torch.Tensor]:
    """(features [N, D], logits [N, 10]): the input of the model's last Linear layer, read by
    a forward hook in eval mode, and the model's output."""
    x = as_images(images)
    layer = penultimate_layer(model)
    feats: list[torch.Tensor] = []
    handle = layer.register_forward_hook(_only_here(
        lambda out, inp: feats.append(inp[0].detach().float().flatten(1).cpu()), inputs=True))
    was_training = model.training
    model.eval()
    logits = []
    try:
        for s in range(0, len(x), batch_size):
            logits.append(_forward(model, x[s : s + batch_size].to(_device(model))).float().cpu())
    finally:
        handle.remove()
        model.train(was_training)
    if not logits:
        return torch.empty(0, layer.in_features), torch.empty(0, 10)
    return torch.cat(feats), torch.cat(logits)


TSNE_ITERATIONS = 500  # 250 with early exaggeration, 250 more: KL 0.88 vs 0.83 at sklearn's 1000
TSNE_ANGLE = 0.65  # Barnes-Hut coarser than the 0.5 default: 15% less CPU, KL 0.884 vs 0.881


def tsne_map(
    features: torch.Tensor | np.ndarray, seed: int = 0, threads: int | None = None
) -> np.ndarray:
    """The features in 2-D with scikit-learn's t-SNE (PCA initialisation, automatic learning
    rate, perplexity 30, 500 iterations, angle 0.65), as float32 [N, 2] scaled into [0, 1].

    Its OpenMP threads are limited to the idle cores (`threads` overrides): on a busy machine a
    second thread made it 3× slower, not faster.
    """
    from sklearn.manifold import TSNE
    from threadpoolctl import threadpool_limits

    from .hardware import idle_cores

    f = np.asarray(torch.as_tensor(features).float().numpy(), dtype=np.float32)
    if len(f) < 5:
        raise MnistlabError(f"an embedding map needs at least 5 images, got {len(f)}")
    perplexity = min(30.0, (len(f) - 1) / 3)
    with threadpool_limits(threads or idle_cores()):
        xy = TSNE(n_components=2, perplexity=perplexity, init="pca", learning_rate="auto",
                  max_iter=TSNE_ITERATIONS, angle=TSNE_ANGLE, random_state=seed).fit_transform(f)
    xy = xy - xy.min(0)
    return (xy / max(float(xy.max()), 1e-12)).astype(np.float32)


@dataclass
class EmbeddingMap:
    """Test digits placed by t-SNE on the model's penultimate features."""

    xy: np.ndarray  # float32 [N, 2] in [0, 1]
    indices: np.ndarray  # int64 [N]: which images of the split
    labels: np.ndarray  # int64 [N]: true digits
    predictions: np.ndarray  # int64 [N]
    probabilities: np.ndarray  # float32 [N]: of the prediction

    def to_dict(self) -> dict[str, list]:
        return {
            "x": [round(float(v), 4) for v in self.xy[:, 0]],
            "y": [round(float(v), 4) for v in self.xy[:, 1]],
            "index": self.indices.tolist(),
            "label": self.labels.tolist(),
            "prediction": self.predictions.tolist(),
            "probability": [round(float(p), 4) for p in self.probabilities],
        }


def embedding_map(
    model: nn.Module,
    images: torch.Tensor | np.ndarray,
    labels: torch.Tensor | np.ndarray,
    n: int = 2000,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> EmbeddingMap:
    """t-SNE of the penultimate features of `n` images drawn at random (seeded) from a split."""
    x = as_images(images)
    y = torch.as_tensor(labels).long()
    rng = np.random.default_rng(seed)
    take = np.sort(rng.choice(len(x), size=min(n, len(x)), replace=False))
    feats, logits = penultimate_features(model, x[take])
    if progress:
        progress(f"t-SNE of {len(take)} digits' {feats.shape[1]} features")
    probs = logits.softmax(1)
    conf, pred = probs.max(1)
    return EmbeddingMap(tsne_map(feats, seed), take.astype(np.int64), y[take].numpy(),
                        pred.numpy(), conf.numpy().astype(np.float32))
