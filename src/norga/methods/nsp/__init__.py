"""VPT-NSP² (prompt tuning in the null space of previous tasks): its numeric parts.

`statistics`: per-layer, per-head feature statistics of old tasks' images; `null_space`: the null-space projectors
built from them (the paper's projector by default, the official code's behind compat switches). The optimizer that
applies them is `norga.runtime.projected_adam.ProjectedAdam`. No method is registered here yet.
"""
