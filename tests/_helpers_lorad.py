"""Shared by the LoRaD tests (tests/lorad/): the float64 reference rotation (explicit n×n
block-diagonal rotation matrices, not the pair slicing of the code under test), a float64 numpy
view of a tensor, and a dispatch mode that records every matmul a forward runs."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode


def reference_rotate(weight: np.ndarray, theta: np.ndarray) -> np.ndarray:
    """Float64 W' with row i = R_i W_i, R_i the explicit block-diagonal rotation matrix."""
    m, n = weight.shape
    out = np.empty((m, n), dtype=np.float64)
    for i in range(m):
        rot = np.zeros((n, n))
        for k in range(n // 2):
            c, s = np.cos(theta[i, k]), np.sin(theta[i, k])
            rot[2 * k : 2 * k + 2, 2 * k : 2 * k + 2] = [[c, -s], [s, c]]
        out[i] = rot @ weight[i]
    return out


def f64(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float64).numpy()


class CountMatmuls(TorchDispatchMode):
    """Records (op name, argument shapes) of every matmul-like aten call while active."""

    MATMULS = ("aten.mm", "aten.addmm", "aten.bmm", "aten.baddbmm", "aten.matmul", "aten.linear")

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, list[tuple[int, ...]]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        if name in self.MATMULS:
            self.calls.append((name, [tuple(a.shape) for a in args if isinstance(a, torch.Tensor)]))
        return func(*args, **(kwargs or {}))
