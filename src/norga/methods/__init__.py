"""Continual-learning methods, registered by name (`METHODS`)."""

# importing registers them: "norga", "hide", "l2p", "dualprompt", "sprompt", "coda", "linear_probe", "ncm"
from norga.methods import coda, hide, keyed, linear_probe, ncm  # noqa: F401
from norga.methods.base import METHOD_SETTINGS, METHODS, ContinualMethod, Phase, Prediction, register_method

__all__ = ["METHODS", "METHOD_SETTINGS", "ContinualMethod", "Phase", "Prediction", "register_method"]
