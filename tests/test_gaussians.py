"""Class Gaussians: statistics against numpy, sampling moments, rank-deficient classes, the TAP sampler."""

import numpy as np
import pytest
import torch

from norga.methods.hide.gaussians import JITTER, ClassGaussians, official_tap_batches


def test_mean_and_covariance_match_numpy():
    features = torch.randn(50, 6) * torch.rand(6) + torch.randn(6)
    gaussians = ClassGaussians()
    gaussians.add_class(3, features)
    x = features.double().numpy()
    np.testing.assert_allclose(gaussians.mean(3).numpy(), x.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(gaussians.covariance(3).numpy(), np.cov(x, rowvar=False) + JITTER * np.eye(6), rtol=1e-5, atol=1e-6)


def test_samples_have_the_class_moments():
    """2e5 draws: the sample mean/cov error is ~O(1/sqrt(n)) = 2e-3 per unit variance; 2e-2 is a safe bound."""
    gaussians = ClassGaussians()
    gaussians.add_class(0, torch.randn(400, 4) @ torch.randn(4, 4) + 3)
    features, labels = gaussians.sample([0], 200_000, torch.Generator().manual_seed(1))
    assert torch.all(labels == 0)
    torch.testing.assert_close(features.mean(0), gaussians.mean(0), atol=2e-2, rtol=0)
    torch.testing.assert_close(torch.cov(features.T), gaussians.covariance(0), atol=2e-2 * gaussians.covariance(0).abs().max().item(), rtol=0)


def test_rank_deficient_class_still_factorises():
    """Fewer samples than dimensions (CUB has ~30 images per class at width 768)."""
    gaussians = ClassGaussians()
    gaussians.add_class(5, torch.randn(10, 64) * 20)
    features, _ = gaussians.sample([5], 3)
    assert torch.isfinite(features).all()


def test_shrinkage_pulls_toward_a_scaled_identity():
    features = torch.randn(30, 5)
    plain, shrunk = ClassGaussians(), ClassGaussians(shrinkage=1.0)
    plain.add_class(0, features)
    shrunk.add_class(0, features)
    cov = torch.cov(features.double().T)
    expected = (cov.diagonal().mean() + JITTER) * torch.eye(5, dtype=torch.float64)
    torch.testing.assert_close(shrunk.covariance(0).double(), expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="shrinkage"):
        ClassGaussians(shrinkage=1.5)


def test_official_tap_batches_use_previous_class_count_chunks():
    gaussians = ClassGaussians()
    for label in range(6):
        gaussians.add_class(label, torch.randn(20, 3) + label)
    chunks = list(official_tap_batches(gaussians, list(range(6)), 4, 8, torch.Generator().manual_seed(0)))
    assert len(chunks) == 4 and all(f.shape == (8, 3) and l.shape == (8,) for f, l in chunks)
    labels = torch.cat([l for _, l in chunks])
    assert len(set(labels.tolist())) > 2  # shuffled across classes, not class after class
    assert len(list(official_tap_batches(gaussians, list(range(6)), 6, 8))) == 6


def test_state_round_trip_and_errors():
    gaussians = ClassGaussians()
    gaussians.add_class(2, torch.randn(12, 4))
    gaussians.add_class(7, torch.randn(12, 4))
    restored = ClassGaussians()
    restored.load_state_dict(gaussians.state_dict())
    assert restored.labels == [2, 7]
    torch.testing.assert_close(restored.means([7, 2]), gaussians.means([7, 2]))
    g = torch.Generator().manual_seed(3)
    a = gaussians.sample([2, 7], 5, g)[0]
    b = restored.sample([2, 7], 5, torch.Generator().manual_seed(3))[0]
    torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="at least 2 feature vectors"):
        gaussians.add_class(1, torch.randn(1, 4))
