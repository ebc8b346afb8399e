"""Process topology of a training run: where this process sits among the ranks started by
``accelerate launch`` (one process when alone), and what the ranks agree on: averaged
tensors, barriers, a stop at the same step and a checksum of the trained weights.

Every rank draws the noise and prompts of the WHOLE global batch from the same generator
and keeps its own slice, so RNG state and data position are identical on every rank.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from wadi_cli.distill.launch import launched_world_size
from wadi_cli.machine import resolve_device


@dataclass(frozen=True)
class Topology:
    """Where this process sits in a (possibly multi-process, via accelerate) run. Every
    rank draws the noise and prompts of the WHOLE global batch from the same generator and
    keeps its own slice, so RNG state and data position are identical on every rank."""

    rank: int = 0
    world: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def mean(self, tensor: Tensor) -> Tensor:
        """Average ``tensor`` over ranks (accelerate's ``reduce``; identity when alone)."""
        if self.world == 1:
            return tensor
        from accelerate.utils import reduce

        return reduce(tensor, "mean")

    def slice(self, batch: int) -> slice:
        return slice(self.rank * batch, (self.rank + 1) * batch)


def launch_rank() -> int:
    """This process's rank as set by ``accelerate launch`` / ``torchrun`` (0 when alone),
    known before the process group exists."""
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def process_topology(device: str) -> tuple[Topology, torch.device]:
    """This process's rank and device (``device``: the config's ``auto``/``cpu``/``cuda``…).
    Under ``accelerate launch`` (``WORLD_SIZE`` > 1) the process group is set up by
    accelerate (gloo on CPU, NCCL on GPUs)."""
    if launched_world_size() <= 1:
        return Topology(), resolve_device(device)
    from accelerate import PartialState

    state = PartialState(cpu=device == "cpu")
    return Topology(state.process_index, state.num_processes), state.device


def barrier(topology: Topology) -> None:
    """Wait for every rank (nothing when alone)."""
    if topology.world > 1:
        from accelerate import PartialState

        PartialState().wait_for_everyone()


def synced_stop(stop: bool, topology: Topology, device: torch.device) -> bool:
    """Ctrl-C on any rank stops every rank at the same step."""
    if topology.world == 1:
        return stop
    flag = torch.tensor([float(stop)], device=device)
    return float(topology.mean(flag)) > 0


def tensors_checksum(tensors: Mapping[str, Tensor]) -> str:
    """A short SHA-256 of named tensors (names and bytes, in name order)."""
    h = hashlib.sha256()
    for k, v in sorted(tensors.items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def rank_checksums(tensors: Mapping[str, Tensor], topology: Topology) -> list[str]:
    """:func:`tensors_checksum` of ``tensors`` on every rank (they must agree)."""
    mine = tensors_checksum(tensors)
    if topology.world == 1:
        return [mine]
    from accelerate.utils import gather_object

    return list(gather_object([mine]))
