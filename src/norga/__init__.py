"""norga: prompt-based continual learning (NoRGa, HiDe-Prompt and baselines) on pre-trained timm ViTs."""

__version__ = "0.1.0"
