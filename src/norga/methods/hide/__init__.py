"""HiDe-Prompt and NoRGa as a package of components: the two registered methods (`pipeline`), their settings,
the task-identity model (`task_identity`) with its class Gaussians (`gaussians`), the prompted-feature memo, and
the official code's checkpoint loaders (`official_checkpoints`, `official_tii`). Nothing outside this package
names either method."""

from norga.methods.hide.pipeline import HiDePrompt, NoRGa, contrastive_loss, official_class_order
from norga.methods.hide.settings import HiDeSettings, NoRGaSettings, TAPConfig

__all__ = ["HiDePrompt", "HiDeSettings", "NoRGa", "NoRGaSettings", "TAPConfig", "contrastive_loss",
           "official_class_order"]
