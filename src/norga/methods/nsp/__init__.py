"""VPT-NSP² (prompt tuning in the null space of previous tasks), registered as ``vptnsp`` (`method`).

`statistics`: per-layer, per-head feature statistics of old tasks' images; `collector`: the pass that records them
on the host; `null_space`: the null-space projectors built from them (the paper's exact projector by default, the
official code's behind compat switches); `settings`: the method's settings. The optimizer that applies the
projectors is `norga.runtime.projected_adam.ProjectedAdam`.
"""

from norga.methods.nsp.method import VPTNSP
from norga.methods.nsp.settings import NSPTrainConfig, VPTNSPSettings

__all__ = ["VPTNSP", "NSPTrainConfig", "VPTNSPSettings"]
