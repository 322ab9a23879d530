"""Checkpoint fusion library: per-tensor merge methods, one merge engine over lazily read sources, Self Positioning.

No Lightning and no CLI here: orchestration (the fusion leaderboard, `codiemb fuse`, BOOM) lives in
`codiemb_pl.workflows`.
"""

from codiemb_pl.fusion.engine import Merge, merge_state_dicts, merge_to_safetensors
from codiemb_pl.fusion.keys import key_seed, layer_of
from codiemb_pl.fusion.methods import (
    MERGE_METHODS,
    check_method_params,
    dare,
    delta_guided,
    get_merge_method,
    merge_needs,
    method_parameters,
    multi_slerp,
    slerp,
    task_arithmetic,
    ties,
    uniform_soup,
)
from codiemb_pl.fusion.self_positioning import SelfPositioning, fit_self_positioning
from codiemb_pl.fusion.soup import GreedySoupResult, greedy_soup
from codiemb_pl.fusion.sources import MappingSource, SafetensorsSource, TensorSource, as_source, open_checkpoint
from codiemb_pl.fusion.writer import save_state_dict, write_safetensors

__all__ = [
    "MERGE_METHODS", "check_method_params", "dare", "delta_guided", "get_merge_method", "merge_needs",
    "method_parameters", "multi_slerp", "slerp", "task_arithmetic", "ties", "uniform_soup",
    "SelfPositioning", "fit_self_positioning",
    "Merge", "merge_state_dicts", "merge_to_safetensors", "GreedySoupResult", "greedy_soup", "key_seed", "layer_of",
    "MappingSource", "SafetensorsSource", "TensorSource", "as_source", "open_checkpoint",
    "save_state_dict", "write_safetensors",
]
