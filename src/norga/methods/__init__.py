"""Continual-learning methods, registered by name (`METHODS`): each is one module (or package) with its class and
settings.

Importing this package registers the built-in ones: every module or package in it that defines a method
registers it with `register_method` (found by `pkgutil`, so a new built-in method is one new file). Methods of other
packages register through the ``norga.methods`` entry-point group (`norga.methods.registry`).
"""

import importlib
import pkgutil

from norga.methods.base import Capabilities, ContinualMethod, ImageIds, Phase, Prediction, PredictRequest
from norga.methods.registry import METHODS, method_class, method_names, register_method, settings_class

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["METHODS", "Capabilities", "ContinualMethod", "ImageIds", "Phase", "PredictRequest", "Prediction",
           "method_class", "method_names", "register_method", "settings_class"]
