"""The task-identity-inference (TII) model: frozen CLS features -> residual MLP -> head over all classes."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn


class ResidualMLP(nn.Module):
    """``LayerNorm(x + MLP(x))`` with hidden widths ``dim·h`` for h in `hidden` (NORGA_SPEC §1.7).

    Layer 0 is Linear -> GELU -> Dropout; a middle layer at index ``len(hidden)//2`` is followed by
    Dropout + LayerNorm (no activation), other middle layers by GELU + Dropout; the last layer maps back
    to `dim` and is followed by Dropout. `final_norm=False` drops the outer LayerNorm (MoCo v3 uses the
    backbone's ``fc_norm`` instead).
    """

    def __init__(self, dim: int, hidden: Sequence[int] = (2,), dropout: float = 0.0, final_norm: bool = True) -> None:
        super().__init__()
        if not hidden or any(h <= 0 for h in hidden):
            raise ValueError(f"hidden width multipliers must be positive integers, got {list(hidden)}")
        widths = [dim * h for h in hidden]
        layers: list[nn.Module] = [nn.Linear(dim, widths[0]), nn.GELU(), nn.Dropout(dropout)]
        for index in range(1, len(widths)):
            layers.append(nn.Linear(widths[index - 1], widths[index]))
            if index == len(widths) // 2:
                layers += [nn.Dropout(dropout), nn.LayerNorm(widths[index])]
            else:
                layers += [nn.GELU(), nn.Dropout(dropout)]
        layers += [nn.Linear(widths[-1], dim), nn.Dropout(dropout)]
        self.mlp = nn.Sequential(*layers)
        self.norm = nn.LayerNorm(dim) if final_norm else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(x + self.mlp(x))


class TaskIdentityModel(nn.Module):
    """Maps frozen backbone features to logits over all classes; the predicted class gives the task.

    With `fc_norm` (a backbone with MoCo v3's fc_norm, officially) the mapping has no outer LayerNorm and the
    model's own ``fc_norm`` (a LayerNorm with eps 1e-6, the ViT's norm layer) sits before the head.
    """

    def __init__(self, dim: int, num_classes: int, hidden: Sequence[int] = (2,), fc_norm: bool = False) -> None:
        super().__init__()
        self.mapping = ResidualMLP(dim, hidden, final_norm=not fc_norm)
        self.fc_norm = nn.LayerNorm(dim, eps=1e-6) if fc_norm else nn.Identity()
        self.head = nn.Linear(dim, num_classes)

    def embed(self, features: Tensor) -> Tensor:
        """The mapped feature the head sees."""
        return self.fc_norm(self.mapping(features))

    def forward(self, features: Tensor) -> Tensor:
        return self.head(self.embed(features))
