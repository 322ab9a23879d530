"""Checkpoint fusion: per-tensor merge methods, streaming whole-checkpoint merges, Self Positioning."""

from codiemb_pl.fusion.methods import (
    MERGE_METHODS,
    check_method_params,
    dare,
    delta_guided,
    get_merge_method,
    method_parameters,
    multi_slerp,
    slerp,
    task_arithmetic,
    ties,
    uniform_soup,
)
from codiemb_pl.fusion.self_positioning import SelfPositioning, fit_self_positioning
from codiemb_pl.fusion.streaming import (
    GreedySoupResult,
    MappingSource,
    SafetensorsSource,
    TensorSource,
    greedy_soup,
    layer_of,
    merge_state_dicts,
    merge_to_safetensors,
)

__all__ = [
    "MERGE_METHODS", "check_method_params", "dare", "delta_guided", "get_merge_method", "method_parameters",
    "multi_slerp", "slerp", "task_arithmetic", "ties", "uniform_soup",
    "SelfPositioning", "fit_self_positioning",
    "GreedySoupResult", "MappingSource", "SafetensorsSource", "TensorSource", "greedy_soup", "layer_of",
    "merge_state_dicts", "merge_to_safetensors",
]
