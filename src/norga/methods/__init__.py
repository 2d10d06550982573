"""Continual-learning methods, registered by name (`METHODS`): each is one module with its class and settings.

Importing this package registers the built-in ones: "hide", "norga", "l2p", "dualprompt", "sprompt", "coda",
"linear_probe", "ncm".
"""

from norga.methods.base import ContinualMethod, ImageIds, Phase, Prediction
from norga.methods.registry import METHODS, method_class, method_names, register_method, settings_class

from norga.methods import coda, hide, keyed, linear_probe, ncm  # noqa: E402,F401,I001 - registers them

__all__ = ["METHODS", "ContinualMethod", "ImageIds", "Phase", "Prediction", "method_class", "method_names",
           "register_method", "settings_class"]
