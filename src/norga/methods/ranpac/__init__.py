"""The analytic heads ``simplecil`` and ``ranpac`` (`methods`): RanPAC's random features, float64 sufficient
statistics and Cholesky solve (`analytic`), and its per-task choice of the ridge parameter (`ridge_selection`)."""

from norga.methods.ranpac.methods import RanPAC, RanPACSettings, SimpleCIL, SimpleCILSettings

__all__ = ["RanPAC", "RanPACSettings", "SimpleCIL", "SimpleCILSettings"]
