"""NoRGa prompts on a timm ViT in a few lines (the example of docs/guides/library.md)."""

import torch

from norga.nn import PromptedViT, TaskPrompts

host = PromptedViT.from_timm("vit_tiny_patch16_224", num_classes=100)  # any timm ViT; pretrained=True when online
prompts = TaskPrompts(host, num_slots=10, length=5, layers=[0, 1, 2, 3, 4],  # one prefix slot per task
                      gate="sigmoid")  # NoRGa gate s + α·σ(τ·s) on prompt scores; gate="none" is HiDe-Prompt
trainable = prompts.train_slot(0, "first") + host.head_parameters()  # task 0: slot 0, the gates and the head
images = torch.randn(4, 3, 224, 224)
out = host(images, prefixes=prompts.prefixes(0, len(images)))  # every sample uses slot 0
torch.nn.functional.cross_entropy(out.logits, torch.tensor([1, 2, 3, 4])).backward()
per_sample = host(images, prefixes=prompts.prefixes(torch.tensor([0, 3, 1, 0]), len(images)))  # a slot per sample
frozen = host(images)  # the plain frozen backbone: same module, no prompts
print("features", tuple(out.features.shape), "logits", tuple(per_sample.logits.shape),
      "trainable", sum(p.numel() for p in trainable))
