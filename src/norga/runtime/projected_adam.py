"""Adam whose final step is projected per parameter: θ ← θ + L·u·R (VPT-NSP²'s ModAdam, reusable).

The moments and the bias correction see the raw gradient (plus coupled L2 weight decay, as torch's Adam); only the
finished step u of a parameter viewed as a matrix (rows = all leading dimensions, columns = the last one) is
multiplied on the left by L and on the right by R. A parameter without projectors takes exactly torch's Adam step
(the same operations as ``torch.optim.Adam(foreach=False)``), so an optimizer with no projections is Adam.

Projectors are keyed by parameter name (build the optimizer from ``named_parameters()``), set and replaced between
tasks with `set_projection`. They are not part of the optimizer state (they are the method's, and large); the state
dict records a fingerprint of each, and `load_state_dict` refuses a state saved under other projections.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

STATE_KEY = "projection_fingerprints"


def matrix_shape(param: Tensor) -> tuple[int, int]:
    """How a parameter is seen by its projectors: (product of the leading dimensions, last dimension)."""
    columns = param.shape[-1] if param.dim() else 1
    return param.numel() // max(columns, 1), columns


def fingerprint(tensor: Tensor | None) -> str | None:
    """sha256 of a tensor's dtype, shape and bytes (None for an identity side)."""
    if tensor is None:
        return None
    data = tensor.detach().to("cpu").contiguous()
    digest = hashlib.sha256(f"{data.dtype}{tuple(data.shape)}".encode())
    digest.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return digest.hexdigest()


class ProjectedAdam(torch.optim.Optimizer):
    """Adam (coupled L2 weight decay) whose step of a named parameter is replaced by ``left @ step @ right``."""

    def __init__(self, named_params: Iterable[tuple[str, Tensor]] | Iterable[dict[str, Any]], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0) -> None:
        if not lr >= 0.0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        if not eps >= 0.0:
            raise ValueError(f"eps must be >= 0, got {eps}")
        if not all(0.0 <= beta < 1.0 for beta in betas) or len(betas) != 2:
            raise ValueError(f"betas must be two values in [0, 1), got {betas}")
        if not weight_decay >= 0.0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        self._projections: dict[str, tuple[Tensor | None, Tensor | None]] = {}
        self._fingerprints: dict[str, tuple[str | None, str | None]] = {}
        super().__init__(named_params, {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay})

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """torch's, for named parameters only (projections are keyed by name); names are unique."""
        super().add_param_group(param_group)
        if "param_names" not in self.param_groups[-1]:
            self.param_groups.pop()
            raise TypeError("ProjectedAdam keys projections by parameter name: pass named parameters, e.g. "
                            "model.named_parameters() or groups {'params': [(name, tensor), ...]}")
        names = self.parameter_names()
        if len(set(names)) != len(names):
            self.param_groups.pop()
            raise ValueError(f"parameter names must be unique, got {sorted({n for n in names if names.count(n) > 1})}")

    def parameter_names(self) -> list[str]:
        return [name for group in self.param_groups for name in group["param_names"]]

    def _parameter(self, name: str) -> Tensor:
        for group in self.param_groups:
            if name in group["param_names"]:
                return group["params"][group["param_names"].index(name)]
        raise KeyError(f"no parameter named {name!r} in this optimizer; its parameters: {self.parameter_names()}")

    # projections ------------------------------------------------------------------------------------------------

    def set_projection(self, name: str, left: Tensor | None = None, right: Tensor | None = None) -> None:
        """Project parameter `name`'s steps as ``left @ step @ right`` (None: identity on that side).

        The matrices are copied in the parameter's dtype and device; setting both to None removes the projection.
        """
        param = self._parameter(name)
        rows, columns = matrix_shape(param)
        for side, matrix, size in (("left", left, rows), ("right", right, columns)):
            if matrix is not None and tuple(matrix.shape) != (size, size):
                raise ValueError(f"{side} projector of {name!r} must be {size}x{size} (parameter {tuple(param.shape)} "
                                 f"seen as a {rows}x{columns} matrix), got {tuple(matrix.shape)}")
        if left is None and right is None:
            self._projections.pop(name, None)
            self._fingerprints.pop(name, None)
            return
        copies = tuple(None if m is None else m.detach().to(device=param.device, dtype=param.dtype, copy=True)
                       for m in (left, right))
        self._projections[name] = copies
        self._fingerprints[name] = (fingerprint(copies[0]), fingerprint(copies[1]))

    def projection(self, name: str) -> tuple[Tensor | None, Tensor | None]:
        """(left, right) of parameter `name`; (None, None) when its steps are not projected."""
        self._parameter(name)
        return self._projections.get(name, (None, None))

    def clear_projections(self) -> None:
        self._projections.clear()
        self._fingerprints.clear()

    @property
    def projected_names(self) -> list[str]:
        return sorted(self._projections)

    # state --------------------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """torch's optimizer state plus the fingerprints of the projections it was taken under."""
        state = super().state_dict()
        state[STATE_KEY] = {name: list(pair) for name, pair in sorted(self._fingerprints.items())}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state saved by this class (or by torch's Adam: no projections) for the same named parameters.

        Set the projections the state was saved under first (`set_projection`): a mismatch raises.
        """
        saved_names = [name for group in state_dict["param_groups"] for name in group.get("param_names", [])]
        if saved_names and saved_names != self.parameter_names():
            raise ValueError(f"optimizer state is for parameters {saved_names}, this optimizer has "
                             f"{self.parameter_names()}; build it from the same named parameters")
        saved = {name: tuple(pair) for name, pair in state_dict.get(STATE_KEY, {}).items()}
        if saved != self._fingerprints:
            raise ValueError(f"optimizer state was saved with projections on {sorted(saved)} and this optimizer "
                             f"has them on {self.projected_names} (or different matrices); call set_projection "
                             "with the projectors the state was saved under before load_state_dict")
        super().load_state_dict({key: value for key, value in state_dict.items() if key != STATE_KEY})

    # the update ---------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for name, param in zip(group["param_names"], group["params"]):
                if param.grad is None:
                    continue
                if param.grad.is_sparse:
                    raise RuntimeError("ProjectedAdam does not support sparse gradients")
                self._update(param, self._projections.get(name), group["lr"], beta1, beta2, group["eps"],
                             group["weight_decay"])
        return loss

    def _update(self, param: Tensor, projection: tuple[Tensor | None, Tensor | None] | None, lr: float,
                beta1: float, beta2: float, eps: float, weight_decay: float) -> None:
        """torch.optim.Adam's single-tensor update, operation for operation, with the step projected."""
        state = self.state[param]
        if not state:
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        grad, exp_avg, exp_avg_sq = param.grad, state["exp_avg"], state["exp_avg_sq"]
        state["step"] += 1
        if weight_decay != 0:
            grad = grad.add(param, alpha=weight_decay)
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        step = state["step"].item()
        step_size = lr / (1 - beta1 ** step)
        denom = (exp_avg_sq.sqrt() / (1 - beta2 ** step) ** 0.5).add_(eps)
        if projection is None:
            param.addcdiv_(exp_avg, denom, value=-step_size)
            return
        left, right = projection
        update = torch.zeros_like(param).addcdiv_(exp_avg, denom, value=-step_size).view(matrix_shape(param))
        if left is not None:
            update = left @ update
        if right is not None:
            update = update @ right
        param.add_(update.view_as(param))
