"""NoRGa prompts on a timm ViT in a few lines (the README's library example)."""

import torch

from norga.nn import PromptedViT

model = PromptedViT.from_timm(
    "vit_tiny_patch16_224",           # any timm ViT; pretrained=True takes timm's weights when online
    num_slots=10, prompt_length=5,    # one prefix slot per task, 5 key/value vectors per prompted layer
    gate="sigmoid", num_classes=100,  # NoRGa gate s + α·σ(τ·s) on prompt scores; gate=None is HiDe-Prompt
)
model.pool.set_trainable_slot(0)      # training task 0: only slot 0 (plus gates and head) learns
images = torch.randn(4, 3, 224, 224)
out = model(images, slots=0)          # every sample uses slot 0
torch.nn.functional.cross_entropy(out.logits, torch.tensor([1, 2, 3, 4])).backward()
per_sample = model(images, slots=torch.tensor([0, 3, 1, 0]))  # inference: a slot per sample
frozen = model(images)                # the plain frozen backbone, same module, no prompts
print("features", tuple(out.features.shape), "logits", tuple(per_sample.logits.shape),
      "trainable", sum(p.numel() for p in model.parameters() if p.requires_grad))
