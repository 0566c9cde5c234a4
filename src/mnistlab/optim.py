"""Adam and AdamW as one call to torch's fused kernel, without torch.optim's overheads.

`torch.optim.Adam(fused=True)` runs the same kernel, but building any `torch.optim` optimizer
imports `torch._dynamo` (1.2 s here, a third of the lab's whole run), and its `step` regroups
the tensors by device and dtype on every call. `FusedAdam` keeps torch's state layout and
`state_dict` format, so its checkpoints load into `torch.optim.Adam` and back, and its updates
are bit-identical to torch's fused Adam. It is a `torch.optim.Optimizer`, so torch's LR
schedulers drive it; optimizer step hooks are not supported.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

_HOOKS = (
    "_optimizer_step_pre_hooks", "_optimizer_step_post_hooks",
    "_optimizer_state_dict_pre_hooks", "_optimizer_state_dict_post_hooks",
    "_optimizer_load_state_dict_pre_hooks", "_optimizer_load_state_dict_post_hooks",
)


class FusedAdam(torch.optim.Optimizer):
    """Adam (or, with `decoupled_weight_decay`, AdamW) over one group of CPU or CUDA params."""

    def __init__(
        self,
        params: Iterable[nn.Parameter],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        decoupled_weight_decay: bool = False,
    ) -> None:
        params = list(params)
        if not params:
            raise ValueError("FusedAdam got an empty parameter list")
        if any(p.device.type not in ("cpu", "cuda") or not p.is_floating_point() for p in params):
            raise ValueError("FusedAdam needs floating-point parameters on CPU or CUDA")
        # Not Optimizer.__init__: its add_param_group is wrapped in torch._disable_dynamo, whose
        # first call imports torch._dynamo. The attributes it would set are set here instead.
        # The keys and order of torch.optim.Adam's param group, so state dicts are interchangeable.
        self.defaults: dict[str, Any] = {
            "lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay,
            "amsgrad": False, "maximize": False, "foreach": None, "capturable": False,
            "differentiable": False, "fused": True,
            "decoupled_weight_decay": decoupled_weight_decay,
        }
        self.param_groups: list[dict[str, Any]] = [{"params": params, **self.defaults}]
        self.state: dict[nn.Parameter, dict[str, torch.Tensor]] = {}  # type: ignore[assignment]
        for name in _HOOKS:
            setattr(self, name, OrderedDict())
        self._warned_capturable_if_run_uncaptured = True
        self._key: tuple[bool, ...] | None = None  # which params had gradients at the last step
        self._groups: list[tuple[Any, ...]] = []

    def register_step_pre_hook(self, hook: Any) -> Any:
        raise NotImplementedError("FusedAdam does not run optimizer step hooks")

    register_step_post_hook = register_step_pre_hook

    @property
    def params(self) -> list[nn.Parameter]:
        return self.param_groups[0]["params"]

    def _state(self, p: nn.Parameter) -> dict[str, torch.Tensor]:
        s = self.state.get(p)
        if s is None:  # what torch's fused Adam creates: a float32 step counter on the device
            s = self.state[p] = {
                "step": torch.zeros((), dtype=torch.float32, device=p.device),
                "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format),
            }
        return s

    def zero_grad(self, set_to_none: bool = True) -> None:  # without torch's dynamo wrapper
        for p in self.params:
            if p.grad is None:
                continue
            if set_to_none:
                p.grad = None
            else:
                p.grad.zero_()

    @torch.no_grad()
    def step(self, closure: None = None) -> None:  # type: ignore[override]
        """One update of every parameter that has a gradient (those without are skipped)."""
        if closure is not None:
            raise ValueError("FusedAdam.step takes no closure")
        key = tuple(p.grad is not None for p in self.params)
        if key != self._key:  # the tensor lists change only when that set does
            self._groups, self._key = self._build(), key
        g = self.param_groups[0]
        kernel = torch._fused_adamw_ if g["decoupled_weight_decay"] else torch._fused_adam_
        beta1, beta2 = g["betas"]
        for params, exp_avgs, exp_avg_sqs, steps, counts in self._groups:
            counts.add_(1)  # every step counter of the group: they are views into `counts`
            kernel(
                params, [p.grad for p in params], exp_avgs, exp_avg_sqs, [], steps,
                amsgrad=False, lr=g["lr"], beta1=beta1, beta2=beta2,
                weight_decay=g["weight_decay"], eps=g["eps"], maximize=False,
                grad_scale=None, found_inf=None,
            )

    def _build(self) -> list[tuple[Any, ...]]:
        """Per device and dtype (the kernel takes one of each): params, moments, step counts."""
        groups: dict[tuple[torch.device, torch.dtype], list[nn.Parameter]] = {}
        for p in self.params:
            if p.grad is not None:
                groups.setdefault((p.device, p.dtype), []).append(p)
        out = []
        for params in groups.values():
            states = [self._state(p) for p in params]
            # One tensor holds the group's step counts, so one op advances them all (torch's
            # _foreach_add_ over separate 0-dim tensors costs 25 µs a step on CPU).
            counts = torch.stack([s["step"] for s in states])
            for i, s in enumerate(states):
                s["step"] = counts[i]
            out.append((params, [s["exp_avg"] for s in states],
                        [s["exp_avg_sq"] for s in states], [s["step"] for s in states], counts))
        return out

    def state_dict(self) -> dict[str, Any]:
        """The layout of `torch.optim.Adam.state_dict()`: parameters by index."""
        index = {p: i for i, p in enumerate(self.params)}
        group = {k: v for k, v in self.param_groups[0].items() if k != "params"}
        group["params"] = list(range(len(self.params)))
        return {
            # Own copies of the step counts (views of one tensor here) and moments.
            "state": {index[p]: {k: v.clone() for k, v in s.items()}
                      for p, s in self.state.items()},
            "param_groups": [group],
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict of this class or of `torch.optim.Adam`/`AdamW` (one group)."""
        groups = state_dict["param_groups"]
        if len(groups) != 1 or len(groups[0]["params"]) != len(self.params):
            raise ValueError("optimizer state does not match the model's parameters")
        params = self.params
        saved = groups[0]
        if saved.get("amsgrad") or saved.get("maximize"):
            raise ValueError("FusedAdam has no amsgrad or maximize; this state needs torch's Adam")
        self._key = None
        # Every saved setting, as torch does: LR schedulers keep theirs (initial_lr, max_lr, the
        # momentum range) in the group too.
        group = {k: tuple(v) if k == "betas" else v for k, v in saved.items() if k != "params"}
        self.param_groups[0] = {"params": params, **group}
        self.state = {}
        for i, s in state_dict["state"].items():
            p = params[int(i)]
            self.state[p] = {
                "step": torch.as_tensor(s["step"], dtype=torch.float32).to(p.device).clone(),
                "exp_avg": s["exp_avg"].to(p.device, p.dtype).clone(),
                "exp_avg_sq": s["exp_avg_sq"].to(p.device, p.dtype).clone(),
            }

