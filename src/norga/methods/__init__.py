"""Continual-learning methods, registered by name (`METHODS`)."""

from norga.methods import hide  # noqa: F401  (registers "norga" and "hide")
from norga.methods.base import METHODS, ContinualMethod, Phase, Prediction, register_method

__all__ = ["METHODS", "ContinualMethod", "Phase", "Prediction", "register_method"]
