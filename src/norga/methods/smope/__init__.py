"""SMoPE: the registered method (`method`), its settings, and the shared pool of prefix experts with its routing,
losses and usage state (`experts`)."""

from norga.methods.smope.method import SMoPE
from norga.methods.smope.settings import AlignmentConfig, SMoPEOptim, SMoPESettings

__all__ = ["AlignmentConfig", "SMoPE", "SMoPEOptim", "SMoPESettings"]
