"""The swap experiment (WaDi §1): give a one-step student its teacher's row norms or its
teacher's row directions, write the hybrid as a loadable checkpoint, and compare the
variants (images and, for the tiny backbone, accuracy / Fréchet distance)."""

from wadi_cli.swap.compare import (
    VARIANT_LABELS,
    VARIANTS,
    evaluate_swap_variants,
    render_swap_grids,
    variant_states,
)
from wadi_cli.swap.core import (
    KEEP_CHOICES,
    VARIANT_OF_KEEP,
    RowCounts,
    SwapStats,
    check_alpha,
    check_compatible,
    check_keep,
    check_output,
    compile_filter,
    open_student,
    plan_swap,
    slerp_rows,
    swap_rows,
    swap_state_dict,
    swappable_names,
    write_swap,
)

__all__ = [
    "KEEP_CHOICES",
    "VARIANTS",
    "VARIANT_LABELS",
    "VARIANT_OF_KEEP",
    "RowCounts",
    "SwapStats",
    "check_alpha",
    "check_compatible",
    "check_keep",
    "check_output",
    "compile_filter",
    "evaluate_swap_variants",
    "open_student",
    "plan_swap",
    "render_swap_grids",
    "slerp_rows",
    "swap_rows",
    "swap_state_dict",
    "swappable_names",
    "variant_states",
    "write_swap",
]
