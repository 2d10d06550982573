"""The official transforms at any backbone size, normalisation modes, and seeded DataLoaders."""

import numpy as np
import pytest
import timm
import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2 as T

from norga.data import ImageDataset, backbone_input, build_transforms, make_loader


def by_type(compose):
    return {type(t).__name__: t for t in compose.transforms}


def test_official_cifar_transforms_exactly():
    train, test = build_transforms(224, (0.5,) * 3, (0.5,) * 3, "official", cifar_style=True)
    parts = by_type(train)
    assert list(parts) == ["RandomResizedCrop", "RandomHorizontalFlip", "ColorJitter", "ToDtype", "Normalize"]
    crop = parts["RandomResizedCrop"]
    assert tuple(crop.size) == (224, 224) and crop.scale == (0.08, 1.0) and crop.interpolation == InterpolationMode.BICUBIC
    assert parts["ColorJitter"].brightness == pytest.approx((1 - 63 / 255, 1 + 63 / 255))
    assert list(parts["Normalize"].mean) == [0.5071, 0.4867, 0.4408]
    assert list(parts["Normalize"].std) == [0.2675, 0.2565, 0.2761]
    tests = by_type(test)
    assert list(tests["Resize"].size) == [256] and tests["Resize"].interpolation == InterpolationMode.BICUBIC
    assert tuple(tests["CenterCrop"].size) == (224, 224)


def test_official_other_transforms_have_no_normalisation():
    train, test = build_transforms(224, (0.5,) * 3, (0.5,) * 3, "official", cifar_style=False)
    crop = by_type(train)["RandomResizedCrop"]
    assert crop.scale == (0.05, 1.0) and crop.interpolation == InterpolationMode.BILINEAR
    assert "ColorJitter" not in by_type(train)
    image = torch.randint(0, 256, (3, 40, 30), dtype=torch.uint8)
    out = test(image)
    assert out.min() >= 0 and out.max() <= 1  # pixels in [0, 1]


@pytest.mark.parametrize("size", [32, 24, 224])
def test_images_come_out_at_the_backbone_size(size):
    for cifar_style in (True, False):
        train, test = build_transforms(size, (0.5,) * 3, (0.5,) * 3, "backbone", cifar_style)
        image = torch.randint(0, 256, (3, 28, 36), dtype=torch.uint8)
        assert train(image).shape == test(image).shape == (3, size, size)
    assert list(by_type(test)["Resize"].size) == [round(size / 0.875)]


def test_backbone_normalisation_uses_the_given_statistics():
    _, test = build_transforms(24, (0.2, 0.4, 0.6), (0.5, 0.25, 0.1), "backbone")
    out = test(torch.full((3, 32, 32), 255, dtype=torch.uint8))
    assert out[:, 0, 0].tolist() == pytest.approx([(1 - 0.2) / 0.5, (1 - 0.4) / 0.25, (1 - 0.6) / 0.1], rel=1e-5)
    with pytest.raises(ValueError, match="unknown normalization 'imagenet'"):
        build_transforms(24, (0.5,) * 3, (0.5,) * 3, "imagenet")


def test_backbone_input_from_a_timm_model():
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=4, depth=1, num_classes=0)
    size, mean, std = backbone_input(model)
    assert size == 32 and mean == pytest.approx((0.5, 0.5, 0.5)) and std == pytest.approx((0.5, 0.5, 0.5))


def test_loader_order_is_fixed_by_the_seed():
    dataset = ImageDataset(torch.randint(0, 256, (40, 3, 4, 4), dtype=torch.uint8), list(range(40)))

    def order(seed):
        return torch.cat([y for _, y in make_loader(dataset, 8, shuffle=True, seed=seed)]).tolist()

    assert order(3) == order(3) and sorted(order(3)) == list(range(40))
    assert order(3) != order(4)
    plain = torch.cat([y for _, y in make_loader(dataset, 16, shuffle=False)]).tolist()
    assert plain == list(range(40))
    with pytest.raises(ValueError, match="workers must be >= 0"):
        make_loader(dataset, 8, workers=-1)


def test_worker_augmentation_is_fixed_by_the_seed():
    transform = T.Compose([T.RandomResizedCrop(8), T.ToDtype(torch.float32, scale=True)])
    dataset = ImageDataset(torch.randint(0, 256, (12, 3, 16, 16), dtype=torch.uint8), [0] * 12, transform)

    def batches(seed):
        return torch.cat([x for x, _ in make_loader(dataset, 6, shuffle=True, seed=seed, workers=1)])

    first = batches(11)
    assert torch.equal(first, batches(11)) and not torch.equal(first, batches(12))


def official_test_transform(size, cifar_style):
    """The official code's test transform (torchvision v1 on PIL images), at `size` (NORGA_SPEC §3.3)."""
    from torchvision import transforms as V1

    mean, std = ((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)) if cifar_style else ((0, 0, 0), (1, 1, 1))
    return V1.Compose([V1.Resize(round(size / 0.875), interpolation=InterpolationMode.BICUBIC), V1.CenterCrop(size),
                       V1.ToTensor(), V1.Normalize(mean, std)])


@pytest.mark.parametrize(("size", "source"), [(224, 32), (32, 32), (224, 300), (32, 28)])
@pytest.mark.parametrize("cifar_style", [True, False])
def test_test_transform_on_uint8_tensors_gives_the_official_pil_pixels(size, source, cifar_style):
    from PIL import Image

    image = torch.randint(0, 256, (3, source, source), dtype=torch.uint8)
    _, test = build_transforms(size, (0.5,) * 3, (0.5,) * 3, "official", cifar_style)
    ours = test(image)
    official = official_test_transform(size, cifar_style)(Image.fromarray(image.permute(1, 2, 0).numpy()))
    std = torch.tensor(by_type(test)["Normalize"].std).view(3, 1, 1)
    levels = ((ours - official) * std * 255).abs()  # difference in 8-bit grey levels
    assert ours.shape == official.shape == (3, size, size)
    assert levels.max() <= 2.0 + 1e-3 and levels.mean() < 0.05  # rounding of the 8-bit resize: rare, 1-2 levels


def test_brightness_jitter_on_uint8_tensors_matches_pil():
    from PIL import Image
    from torchvision.transforms import functional as F1
    from torchvision.transforms.v2 import functional as F2

    image = torch.randint(0, 256, (3, 16, 16), dtype=torch.uint8)
    pil = Image.fromarray(image.permute(1, 2, 0).numpy())
    for factor in (1 - 63 / 255, 0.9, 1.2, 1 + 63 / 255):
        ours = F2.adjust_brightness(image, factor).int()
        official = torch.from_numpy(np.array(F1.adjust_brightness(pil, factor))).permute(2, 0, 1).int()
        assert (ours - official).abs().max() <= 1


def test_train_transforms_keep_the_official_crop_ratio_and_flip():
    for cifar_style in (True, False):
        train, _ = build_transforms(224, (0.5,) * 3, (0.5,) * 3, "official", cifar_style)
        parts = by_type(train)
        assert parts["RandomResizedCrop"].ratio == pytest.approx((3 / 4, 4 / 3))
        assert parts["RandomResizedCrop"].antialias is True and parts["RandomHorizontalFlip"].p == 0.5
