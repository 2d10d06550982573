"""Continual-learning methods, registered by name (`METHODS`)."""

from norga.methods import hide, linear_probe, ncm  # noqa: F401  (register "norga", "hide", "linear_probe", "ncm")
from norga.methods.base import METHOD_SETTINGS, METHODS, ContinualMethod, Phase, Prediction, register_method

__all__ = ["METHODS", "METHOD_SETTINGS", "ContinualMethod", "Phase", "Prediction", "register_method"]
