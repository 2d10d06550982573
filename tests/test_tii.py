"""The task-identity model's residual MLP: structure and parameter counts of the official MlpMapping."""

import pytest
import torch
from torch import nn

from norga.methods.hide.task_identity import ResidualMLP, TaskIdentityModel


@pytest.mark.parametrize(("hidden", "params"), [([2], 2_363_136), ([4, 4], 14_170_368)])
def test_parameter_counts_match_the_official_mlp(hidden, params):
    """NORGA_SPEC §1.7: [2] for CIFAR/ImageNet-R/CUB, [4, 4] for 5-datasets, at width 768."""
    assert sum(p.numel() for p in ResidualMLP(768, hidden).parameters()) == params


def test_middle_layer_has_layernorm_not_activation():
    layers = list(ResidualMLP(8, [4, 4]).mlp)
    kinds = [type(layer) for layer in layers]
    assert kinds == [nn.Linear, nn.GELU, nn.Dropout, nn.Linear, nn.Dropout, nn.LayerNorm, nn.Linear, nn.Dropout]


def test_forward_is_layernorm_of_residual():
    mlp = ResidualMLP(16, [2])
    x = torch.randn(5, 16)
    expected = nn.functional.layer_norm(x + mlp.mlp(x), (16,), mlp.norm.weight, mlp.norm.bias, mlp.norm.eps)
    torch.testing.assert_close(mlp(x), expected)


def test_task_identity_model_shapes_and_fc_norm_variant():
    model = TaskIdentityModel(16, 7)
    assert model(torch.randn(3, 16)).shape == (3, 7)
    moco = TaskIdentityModel(16, 7, fc_norm=True)
    assert isinstance(moco.mapping.norm, nn.Identity) and isinstance(moco.fc_norm, nn.LayerNorm)
    with pytest.raises(ValueError, match="positive integers"):
        ResidualMLP(16, [])
