"""The ``orthogonal`` adapter kind: every row of a frozen Linear weight multiplied by one learned
orthogonal matrix (the paper's orthogonal-map ablation, WaDi Table R4).

For ``W ∈ R^{m×n}`` the adapted weight is

    W' = W Q,   Q ∈ O(n),   so  ‖W'_i‖ = ‖W_i Q‖ = ‖W_i‖  for every row i

(each row's direction is rotated, its norm kept; every row by the same ``Q``, unlike LoRaD's
per-row angles). ``Q`` comes from PyTorch's own map
:func:`torch.nn.utils.parametrizations.orthogonal` (``orthogonal_map`` = ``matrix_exp``,
``cayley`` or ``householder``, never a hand-written one), registered on an ``n×n`` matrix
that starts at the identity, so the adapter is the identity at init.

Cost per adapted layer (``n`` = in_features): ``n²`` stored trainable numbers (torch's
parametrization trains a square ``original``; ``matrix_exp``/``cayley`` read only its strict
lower triangle and ``householder`` its strict lower triangle plus fixed diagonal signs, so
``n(n−1)/2`` of them matter), and per forward one ``O(n³)`` map (a matrix exponential, an
``n×n`` solve, or ``n`` Householder reflections) plus one extra ``tokens × n × n`` matmul
(``x Qᵀ`` before the base layer's own matmul).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrizations

from wadi_cli.errors import BadInputError

#: torch's ``orthogonal_map`` values, in the order help and errors list them.
ORTHOGONAL_MAPS: tuple[str, ...] = ("matrix_exp", "cayley", "householder")
#: The parameter the optimizer trains, inside :class:`OrthogonalLinear` (torch's name).
ORIGINAL = "rotation.parametrizations.weight.original"


def orthogonal_params(in_features: int) -> int:
    """Stored trainable numbers of one ``orthogonal`` adapter: the ``n×n`` matrix torch's
    parametrization trains (for any map)."""
    return in_features * in_features


class OrthogonalLinear(nn.Module):
    """A frozen ``nn.Linear`` (``base_layer``) whose weight is ``W Q`` with ``Q`` orthogonal,
    from torch's parametrization ``orthogonal_map``.

    Forward: ``y = (x Qᵀ) Wᵀ + b = x (W Q)ᵀ + b`` (the bias untouched).
    """

    #: The trainable tensors, by their path in this module (never found by name matching).
    adapter_param_names: tuple[str, ...] = (ORIGINAL,)

    def __init__(self, base_layer: nn.Linear, orthogonal_map: str = "cayley") -> None:
        super().__init__()
        if orthogonal_map not in ORTHOGONAL_MAPS:
            raise BadInputError(
                f"--orthogonal-map must be one of {', '.join(ORTHOGONAL_MAPS)}; got {orthogonal_map!r}"
            )
        self.base_layer = base_layer
        self.orthogonal_map = orthogonal_map
        n = base_layer.in_features
        self.rotation = nn.Module()
        self.rotation.weight = nn.Parameter(torch.eye(n, dtype=torch.float32))
        # trivialization (torch's default): Q = base · map(original), base = I, original = −I
        parametrizations.orthogonal(self.rotation, "weight", orthogonal_map=orthogonal_map)

    def orthogonal_matrix(self) -> Tensor:
        """``Q`` (``n×n``, fp32 or the adapter's dtype)."""
        return self.rotation.weight

    def forward(self, x: Tensor) -> Tensor:
        q = self.orthogonal_matrix()
        rotated = x.to(q.dtype) @ q.T if x.dtype != torch.float64 else x @ q.T.to(x.dtype)
        return self.base_layer(rotated.to(x.dtype))
