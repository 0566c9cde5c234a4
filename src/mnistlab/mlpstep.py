"""The training step of a plain MLP with its backward pass written out: no autograd graph.

For `Flatten → (Linear → ReLU)* → Linear` and cross-entropy, the gradients are a handful of
matrix products, so the step issues about a dozen ops where eager autograd issues some thirty
and records a graph for them; for the lab's small MLP that bookkeeping cost more than the
arithmetic. Gradients land in each parameter's `.grad` (overwritten, so no `zero_grad` is
needed), where any optimizer finds them. Models opt in with a `linear_stack()` method.
"""

from __future__ import annotations

import torch
from torch import nn


def linear_stack(model: nn.Module) -> list[nn.Linear] | None:
    """The Linear layers of a model that is `Flatten → (Linear → ReLU)* → Linear` (in its current
    train/eval mode), else None."""
    stack = getattr(model, "linear_stack", None)
    layers = stack() if callable(stack) else None
    return list(layers) if layers is not None else None


Params = list[tuple[torch.Tensor, torch.Tensor]]  # (weight, bias) per Linear layer


def stack_params(layers: list[nn.Linear]) -> Params:
    """The (weight, bias) of each layer, read once: module attribute lookups cost on a hot path."""
    if not layers or any(not isinstance(m, nn.Linear) or m.bias is None for m in layers):
        raise ValueError("a linear stack needs Linear layers with biases")
    return [(m.weight, m.bias) for m in layers]


def forward_stack(params: Params, x: torch.Tensor) -> list[torch.Tensor]:
    """Each layer's input, then the logits: what `nn.Linear` and `nn.ReLU` compute, to the bit,
    without the module calls."""
    acts = [x.reshape(x.shape[0], -1)]
    last = len(params) - 1
    for i, (w, b) in enumerate(params):
        z = torch.addmm(b, acts[-1], w.t())
        acts.append(z.relu_() if i < last else z)
    return acts


class MLPStep:
    """Forward, cross-entropy (optionally label-smoothed) and backward for a linear stack."""

    def __init__(self, layers: list[nn.Linear], label_smoothing: float = 0.0) -> None:
        self.params = stack_params(layers)
        self.smoothing = float(label_smoothing)
        self.classes = layers[-1].out_features
        self._hit = torch.empty(0)  # -(1 - smoothing) per row, scattered onto the true class

    @classmethod
    def for_model(cls, model: nn.Module, loss_fn: nn.Module) -> MLPStep | None:
        """The step for `model` trained with `loss_fn`, or None where autograd must do it."""
        layers = linear_stack(model)
        if (
            layers is None
            or type(loss_fn) is not nn.CrossEntropyLoss
            or loss_fn.weight is not None
            or loss_fn.reduction != "mean"
            or not all(p.requires_grad for m in layers for p in m.parameters())
        ):
            return None
        return cls(layers, loss_fn.label_smoothing)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean loss, logits) of the batch; the gradients are left in the parameters' `.grad`."""
        n = x.shape[0]
        inputs = forward_stack(self.params, x)  # each layer's input, then the logits
        logits = inputs.pop()
        log_probs = torch.log_softmax(logits, 1)
        loss = nn.functional.nll_loss(log_probs, y)
        eps = self.smoothing
        if eps:  # CrossEntropyLoss(label_smoothing=eps): eps of the target spread over classes
            loss = loss * (1 - eps) - log_probs.mean() * eps
        # d loss / d logits = (softmax - target) / n
        grad = log_probs.exp_()
        if self._hit.shape[0] < n or self._hit.device != x.device:
            self._hit = torch.full((max(n, 64), 1), -(1 - eps), device=x.device)
        grad.scatter_add_(1, y.unsqueeze(1), self._hit[:n])
        if eps:
            grad.sub_(eps / self.classes)
        grad.mul_(1 / n)
        for i in range(len(self.params) - 1, -1, -1):
            (w, b), a = self.params[i], inputs[i]
            if w.grad is None or w.grad.shape != w.shape or b.grad is None:
                w.grad, b.grad = torch.empty_like(w), torch.empty_like(b)
            torch.mm(grad.t(), a, out=w.grad)  # overwritten: no zero_grad needed
            torch.sum(grad, 0, out=b.grad)
            if i:  # through the ReLU whose output is `a`: one op where masking takes two
                grad = torch.ops.aten.threshold_backward(torch.mm(grad, w), a, 0)
        return loss, logits
