"""Checks of an adapter before it is merged: a finite but absurd update is merged as asked,
with one warning.

A LoRaD adapter rotates pairs of weight entries by the angles ``Θ = A B`` (radians,
:func:`~wadi_cli.lorad.layer.lorad_theta`). Angles wrap every 360°, so training has no
reason to go beyond a turn or so (the shipped tiny student's largest angle is 256°, most
are a few degrees); an angle above :data:`ABSURD_ANGLE_DEG` (ten full turns) means the
adapter is broken or scaled by mistake (a ``B`` multiplied by 1e30 gives angles of 1e32°:
finite, and its merge is finite too, since a rotation keeps norms, but meaningless).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from torch import Tensor

from wadi_cli.errors import warn
from wadi_cli.lorad.layer import lorad_theta

#: a rotation angle (degrees) beyond which an adapter's update is called absurd: ten full
#: turns, 14x the largest angle of the shipped tiny student (256°)
ABSURD_ANGLE_DEG = 3600.0


def largest_angles(tensors: Mapping[str, Tensor]) -> dict[str, float]:
    """Module path -> the largest |angle| (degrees) the adapter ``tensors`` rotates by there."""
    out: dict[str, float] = {}
    for key, A in tensors.items():
        if key.endswith(".lorad_A"):
            path = key[: -len(".lorad_A")]
            B = tensors.get(f"{path}.lorad_B")
            if B is not None and A.shape[-1] == B.shape[0]:
                out[path] = math.degrees(float(lorad_theta(A, B).abs().max()))
    return out


def warn_if_absurd(tensors: Mapping[str, Tensor], source: str) -> list[str]:
    """Warn once (and return the modules) when ``source``'s adapter rotates anything by more
    than :data:`ABSURD_ANGLE_DEG`."""
    angles = largest_angles(tensors)
    bad = sorted((p for p, a in angles.items() if not a <= ABSURD_ANGLE_DEG), key=lambda p: -angles[p])
    if bad:
        worst = angles[bad[0]]
        warn(
            f"{source}: the adapter rotates weights by up to {worst:.3g} degrees in {len(bad)} of "
            f"{len(angles)} modules (first: {bad[0]}); above {ABSURD_ANGLE_DEG:g} degrees (ten full turns) "
            "an adapter is broken or mis-scaled, not trained. Merged as asked."
        )
    return bad
