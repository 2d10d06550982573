"""The pretraining recipe: augmentation, schedule, and a tiny end-to-end run writing weights + card."""

import json

import torch
from safetensors.torch import load_file

from norga.backbones import create_backbone
from norga.pretrain import PretrainConfig, lr_at, pretrain, random_crop_flip


def test_random_crop_flip_moves_pixels_within_the_padding():
    images = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8)
    out = random_crop_flip(images, torch.Generator().manual_seed(0), padding=2)
    assert out.shape == images.shape
    for b in range(2):  # each output is a shifted (possibly flipped) window of the zero-padded input
        padded = torch.nn.functional.pad(images[b], (2,) * 4)
        windows = [padded[:, y : y + 8, x : x + 8] for y in range(5) for x in range(5)]
        assert any(torch.equal(out[b], w) or torch.equal(out[b], w.flip(-1)) for w in windows)


def test_lr_warms_up_then_decays():
    assert lr_at(0, 100, 10, 1.0) == 0.1 and lr_at(9, 100, 10, 1.0) == 1.0
    assert lr_at(55, 100, 10, 1.0) == 0.5 and lr_at(100, 100, 10, 1.0) < 1e-9


def test_pretrain_writes_loadable_weights_and_a_card(tmp_path):
    images = torch.randint(0, 256, (64, 3, 16, 16), dtype=torch.uint8)
    labels = torch.arange(64) % 4
    images[labels == 0] //= 4  # some signal
    config = PretrainConfig(epochs=2, batch_size=16, timm_kwargs={"img_size": 16, "patch_size": 8, "depth": 1}, bf16=False)
    card = pretrain(config, (images, labels), (images[:16], labels[:16]), tmp_path / "tiny", "generated", log=lambda _: None)
    assert json.loads((tmp_path / "tiny.json").read_text()) == json.loads(json.dumps(card)) and 0 <= card["test_accuracy"] <= 100
    weights = load_file(str(tmp_path / "tiny.safetensors"))
    assert all(v.dtype == torch.float16 for v in weights.values()) and not any(k.startswith("head.") for k in weights)
    model, record = create_backbone("vit_tiny_patch16_224", weights=str(tmp_path / "tiny.safetensors"),
                                    img_size=16, patch_size=8, depth=1)
    assert record.layout == "safetensors" and torch.equal(model.pos_embed.half(), weights["pos_embed"])
