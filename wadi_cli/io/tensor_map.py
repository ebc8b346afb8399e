"""What every checkpoint looks like to the rest of wadi, and how two of them differ.

- :class:`TensorMap`: the one protocol for "names, shapes, tensors" (a lazy
  :class:`~wadi_cli.io.TensorSource` fits, and so does :class:`DictSource` around an
  in-memory state dict);
- :class:`KeyDiff`: the names and shapes two of them do not share, with one
  :meth:`~KeyDiff.describe` for error messages;
- :func:`preview`: a short list of names for one-line messages.

Shapes are read from headers where the source can (no tensor is read to compare).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch

Shape = tuple[int, ...]


@runtime_checkable
class TensorMap(Protocol):
    """Names → tensors, with shapes and dtypes known without reading data."""

    def keys(self) -> Iterable[str]: ...

    def shape(self, name: str) -> Shape: ...

    def dtype(self, name: str) -> torch.dtype: ...

    def get(self, name: str) -> torch.Tensor: ...

    def __iter__(self) -> Iterator[str]: ...

    def __getitem__(self, name: str) -> torch.Tensor: ...


class DictSource:
    """An in-memory state dict seen as a :class:`TensorMap`."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], description: str = "state dict") -> None:
        self._tensors = tensors
        self.description = description

    def keys(self) -> list[str]:
        return list(self._tensors)

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)

    def __contains__(self, name: object) -> bool:
        return name in self._tensors

    def shape(self, name: str) -> Shape:
        return tuple(self._tensors[name].shape)

    def dtype(self, name: str) -> torch.dtype:
        return self._tensors[name].dtype

    def get(self, name: str) -> torch.Tensor:
        return self._tensors[name]

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._tensors[name]


#: What functions that read tensors by name accept: a lazy source or a state dict.
Tensors = TensorMap | Mapping[str, torch.Tensor]


def as_tensor_map(src: Tensors) -> TensorMap:
    """``src`` itself when it is a :class:`TensorMap`, else a :class:`DictSource` around it."""
    return src if isinstance(src, TensorMap) else DictSource(src)


def _shapes(src: TensorMap | Mapping[str, Any]) -> dict[str, Shape]:
    """Name → shape of a tensor map, a state dict, or a mapping of names to shapes."""
    if isinstance(src, TensorMap):
        return {k: tuple(src.shape(k)) for k in src}
    return {k: tuple(v.shape) if hasattr(v, "shape") else tuple(v) for k, v in src.items()}


def preview(names: Iterable[str], limit: int = 3) -> str:
    """``a, b, c, … (+N)``: the first ``limit`` of ``names`` and how many more there are."""
    names = list(names)
    shown = ", ".join(names[:limit])
    return shown + (f", … (+{len(names) - limit})" if len(names) > limit else "")


@dataclass
class KeyDiff:
    """How the names and shapes of two tensor maps differ.

    ``a`` is the reference (what a model or teacher expects), ``b`` what is compared with
    it: ``only_a`` are names ``b`` lacks, ``only_b`` names ``a`` does not know, ``shapes``
    the common names whose shapes differ, as ``(name, shape in a, shape in b)``; ``common``
    every name both hold. Lists keep the maps' own order (``a``'s for common names).
    """

    only_a: list[str] = field(default_factory=list)
    only_b: list[str] = field(default_factory=list)
    shapes: list[tuple[str, Shape, Shape]] = field(default_factory=list)
    common: list[str] = field(default_factory=list)

    @classmethod
    def between(cls, a: Tensors | Mapping[str, Shape], b: Tensors | Mapping[str, Shape]) -> KeyDiff:
        """Compare ``a`` and ``b``: tensor maps, state dicts or name → shape mappings."""
        sa, sb = _shapes(a), _shapes(b)
        common = [k for k in sa if k in sb]
        return cls(
            only_a=[k for k in sa if k not in sb],
            only_b=[k for k in sb if k not in sa],
            shapes=[(k, sa[k], sb[k]) for k in common if sa[k] != sb[k]],
            common=common,
        )

    @property
    def same_keys(self) -> bool:
        """Both maps hold the same names."""
        return not (self.only_a or self.only_b)

    def __bool__(self) -> bool:
        """True when the maps differ in a name or a shape."""
        return not self.same_keys or bool(self.shapes)

    def describe(self, only_a: str, only_b: str, a: str, b: str) -> str:
        """One line: ``N <only_a> (e.g. …); N <only_b> (e.g. …); N shape mismatch(es),
        <a> vs <b> (e.g. shape differs for NAME: (…) vs (…))``, naming only what differs.

        ``only_a`` / ``only_b`` say what names on one side are (``"missing key(s)"``,
        ``"keys only in the teacher"``), ``a`` / ``b`` what the two sides are.
        """
        parts = []
        if self.only_a:
            parts.append(f"{len(self.only_a)} {only_a} (e.g. {preview(self.only_a)})")
        if self.only_b:
            parts.append(f"{len(self.only_b)} {only_b} (e.g. {preview(self.only_b)})")
        if self.shapes:
            name, sa, sb = self.shapes[0]
            example = f"shape differs for {name}: {sa} vs {sb}"
            parts.append(f"{len(self.shapes)} shape mismatch(es), {a} vs {b} (e.g. {example})")
        return "; ".join(parts)
