"""Continual-learning methods, registered by name (`METHODS`)."""

# importing registers them: "norga", "hide", "l2p", "dualprompt", "sprompt", "coda"
from norga.methods import coda, hide, keyed  # noqa: F401
from norga.methods.base import METHODS, ContinualMethod, Phase, Prediction, register_method

__all__ = ["METHODS", "ContinualMethod", "Phase", "Prediction", "register_method"]
