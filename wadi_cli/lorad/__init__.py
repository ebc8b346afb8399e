"""LoRaD: low-rank rotation of weight directions (WaDi, CVPR 2026, §2).

A LoRaD layer rotates every column pair of every row of a Linear weight by an angle
from a low-rank matrix ``Θ = A B``; it preserves every row norm and changes only
directions. This package holds the config, the layer, model-level inject / merge /
parameter selection, adapter files (save, load, merge on state dicts), the table of
adapter kinds (LoRaD and the peft baselines) and the switchable layers that put several
adapters on one frozen base (:class:`MultiAdapterLinear`).
"""

from wadi_cli.lorad.adapter_io import (
    adapter_paths,
    apply_adapter,
    load_adapter,
    merge_adapter_file,
    merge_adapter_into_state_dict,
    parse_dtype,
    save_adapter,
)
from wadi_cli.lorad.config import ROLES, LoRaDConfig
from wadi_cli.lorad.kinds import ADAPTER_KINDS, make_adapter
from wadi_cli.lorad.layer import LoRaDLinear, lorad_theta, rotate_weight
from wadi_cli.lorad.model import (
    ADAPTER_SUFFIXES,
    adapters_to_fp32,
    count_trainable,
    get_adapter_state_dict,
    get_base_state_dict,
    inject_lorad,
    is_adapter,
    load_adapter_state_dict,
    lorad_layers,
    lorad_parameters,
    mark_only_lorad_trainable,
    merge_lorad,
    remove_lorad,
    unmerge_lorad,
)
from wadi_cli.lorad.multi_adapter import (
    MultiAdapterLinear,
    adapter_parameters,
    adapter_state_dict,
    adapter_targets,
    add_switchable_adapter,
    load_adapter_tensors,
    merged_state_dict,
    switchable_layers,
    use_adapter,
)

__all__ = [
    "ADAPTER_KINDS",
    "ADAPTER_SUFFIXES",
    "ROLES",
    "LoRaDConfig",
    "LoRaDLinear",
    "MultiAdapterLinear",
    "adapter_parameters",
    "adapter_state_dict",
    "adapter_targets",
    "add_switchable_adapter",
    "adapter_paths",
    "apply_adapter",
    "adapters_to_fp32",
    "count_trainable",
    "get_adapter_state_dict",
    "get_base_state_dict",
    "inject_lorad",
    "is_adapter",
    "load_adapter",
    "load_adapter_state_dict",
    "load_adapter_tensors",
    "lorad_layers",
    "lorad_parameters",
    "lorad_theta",
    "make_adapter",
    "mark_only_lorad_trainable",
    "merge_adapter_file",
    "merge_adapter_into_state_dict",
    "merge_lorad",
    "merged_state_dict",
    "parse_dtype",
    "remove_lorad",
    "rotate_weight",
    "save_adapter",
    "switchable_layers",
    "unmerge_lorad",
    "use_adapter",
]
