"""Configuration of a LoRaD adapter (what an adapter file's metadata records)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from wadi_cli.errors import BadInputError

#: Roles an adapter can play in WaDi: the one-step generator, or the fake score model.
ROLES: tuple[str, ...] = ("student", "fake")


@dataclass
class LoRaDConfig:
    """What a LoRaD adapter is: its rank, role, the modules it rotates and its base.

    Attributes:
        rank: rank ``r`` of the angle matrix ``Θ = A B`` (``A`` is ``m×r``, ``B`` is ``r×n/2``).
        role: ``"student"`` (the one-step generator) or ``"fake"`` (the fake score model).
        targets: module paths of the adapted Linears, as named in the base model's state
            dict (``<path>.weight`` is the weight rotated).
        backbone: registry name of the base (``sd15``, ``sd21``, ``pixart``, ``tiny``), if known.
        base_model: hub id or path of the base model, if known.
    """

    rank: int
    role: str = "student"
    targets: tuple[str, ...] = field(default_factory=tuple)
    backbone: str | None = None
    base_model: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise BadInputError(f"LoRaD rank must be a positive integer, got {self.rank!r}")
        if self.role not in ROLES:
            raise BadInputError(f"LoRaD role must be one of {', '.join(ROLES)}; got {self.role!r}")
        if isinstance(self.targets, str):
            raise BadInputError("LoRaD targets must be a sequence of module paths, not one string")
        targets = tuple(self.targets)
        bad = [t for t in targets if not isinstance(t, str) or not t or t.startswith(".") or t.endswith(".")]
        if bad:
            raise BadInputError(f"invalid LoRaD target module path(s): {bad[:5]!r}")
        if len(set(targets)) != len(targets):
            raise BadInputError("LoRaD targets contain duplicates")
        self.targets = targets
        for name in ("backbone", "base_model"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise BadInputError(f"LoRaD {name} must be a string or None, got {value!r}")

    def to_dict(self) -> dict[str, object]:
        """Plain-JSON view (targets as a list)."""
        out = asdict(self)
        out["targets"] = list(self.targets)
        return out
