"""Linear probing: `LinearProbeHead` (`BatchNorm1d(affine=False)` + linear, the paper's appendix A.2) and `LARS`
(the official `util/lars.py`).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


class LinearProbeHead(nn.Sequential):
    """The paper's linear probe: `BatchNorm1d(affine=False)` (it normalises features whose scale differs a lot between
    models, and folds into the linear layer at inference) + a linear classifier initialised with std 0.01."""

    def __init__(self, feature_dim: int, num_classes: int) -> None:
        super().__init__(nn.BatchNorm1d(feature_dim, affine=False, eps=1e-6), nn.Linear(feature_dim, num_classes))
        nn.init.trunc_normal_(self[1].weight, std=0.01)
        nn.init.zeros_(self[1].bias)


class LARS(torch.optim.Optimizer):
    """LARS (You et al., 2017), as in the official MAE linear probing: SGD with momentum where the update of every
    matrix is rescaled by `trust_coefficient * |w| / |g + wd * w|`; biases and norms are plain SGD."""

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict],
        lr: float = 0.0,
        weight_decay: float = 0.0,
        momentum: float = 0.9,
        trust_coefficient: float = 0.001,
    ) -> None:
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, trust_coefficient=trust_coefficient)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: None = None) -> None:  # type: ignore[override]
        for group in self.param_groups:
            for parameter in group["params"]:
                if parameter.grad is None:
                    continue
                update = parameter.grad
                if parameter.ndim > 1:
                    update = update.add(parameter, alpha=group["weight_decay"])
                    param_norm, update_norm = torch.norm(parameter), torch.norm(update)
                    one = torch.ones_like(param_norm)
                    trust = torch.where(
                        (param_norm > 0) & (update_norm > 0), group["trust_coefficient"] * param_norm / update_norm, one
                    )
                    update = update.mul(trust)
                state = self.state[parameter]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(parameter)
                buffer = state["momentum_buffer"]
                buffer.mul_(group["momentum"]).add_(update)
                parameter.add_(buffer, alpha=-group["lr"])
