"""Processes of an evaluation: one, or N under ``accelerate launch`` (``--num-processes``;
gloo on CPU, NCCL on GPUs). Work is split by :func:`wadi_cli.evaluation.folders.shard`;
the main process gathers features and writes every file but the images. accelerate is
imported only when more than one process runs (start-up time)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class Processes:
    """This process's rank, the number of processes, and its device."""

    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        """Wait for every process (nothing to do when alone)."""
        if self.world > 1:
            from accelerate import PartialState

            PartialState().wait_for_everyone()

    def gather(self, items: list[Any]) -> list[Any]:
        """Every process's ``items``, concatenated in rank order (accelerate's
        ``gather_object``)."""
        if self.world == 1:
            return list(items)
        from accelerate.utils import gather_object

        return list(gather_object(items))


def processes(device: torch.device) -> Processes:
    """The topology of this process. Under ``accelerate launch`` (``WORLD_SIZE`` > 1) the
    process group is set up by accelerate, and each process takes its own device."""
    from wadi_cli.distill.launch import launched_world_size

    if launched_world_size() <= 1:
        return Processes(device=device)
    from accelerate import PartialState

    state = PartialState(cpu=device.type == "cpu")
    return Processes(state.process_index, state.num_processes, state.device)
