"""The swap experiment (WaDi §1): give a one-step student its teacher's row norms or its
teacher's row directions, write the hybrid as a loadable checkpoint, and compare the
variants (images and, for the tiny backbone, accuracy / Fréchet distance)."""

from wadi_cli.swap.compare import (
    VARIANT_LABELS,
    VARIANTS,
    SwapSampling,
    evaluate_swap_variants,
    render_swap_grids,
    sample_swap,
    variant_states,
)
from wadi_cli.swap.core import (
    SWAP_VARIANTS,
    VARIANT_OF_KEEP,
    RowCounts,
    SwapStats,
    check_alpha,
    check_compatible,
    check_output,
    check_variant,
    compile_filter,
    open_student,
    plan_swap,
    slerp_rows,
    swap_rows,
    swap_state_dict,
    swappable_names,
    variant_of_keep,
    write_swap,
)

__all__ = [
    "VARIANTS",
    "VARIANT_LABELS",
    "VARIANT_OF_KEEP",
    "SWAP_VARIANTS",
    "RowCounts",
    "SwapSampling",
    "SwapStats",
    "check_alpha",
    "check_compatible",
    "check_output",
    "check_variant",
    "compile_filter",
    "evaluate_swap_variants",
    "open_student",
    "plan_swap",
    "render_swap_grids",
    "sample_swap",
    "slerp_rows",
    "swap_rows",
    "swap_state_dict",
    "swappable_names",
    "variant_of_keep",
    "variant_states",
    "write_swap",
]
