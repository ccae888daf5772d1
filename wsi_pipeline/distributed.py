"""Training under ``torchrun``: the process group, this rank's place, and the DDP wrapper.

Without torchrun (``WORLD_SIZE`` unset or 1) everything here is a no-op: one process, rank 0.
Under torchrun, bags are split over the ranks (gloo on CPU, NCCL on GPUs) and rank 0 evaluates
and writes the run folder.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

__all__ = ["Distributed", "broadcast_flag", "distributed", "launch_place", "wrap_ddp"]


@dataclass(frozen=True)
class Distributed:
    """This process's place in a torchrun job (rank 0 of 1 without torchrun).

    Attributes
    ----------
    rank, world, local_rank : int
        Global rank, number of processes, rank on this machine (its GPU).
    """

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0: the process that evaluates and writes the run folder."""
        return self.rank == 0


@contextlib.contextmanager
def distributed(device: str) -> Iterator[Distributed]:
    """Join the torchrun process group when launched by torchrun (``WORLD_SIZE > 1``).

    Parameters
    ----------
    device : str
        The configured device: NCCL on CUDA unless ``"cpu"``, else gloo.

    Yields
    ------
    Distributed
        Left (the process group destroyed) on exit.
    """
    import torch
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        yield Distributed()
        return
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device != "cpu" and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(local)
    dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    try:
        yield Distributed(rank, world, local)
    finally:
        dist.destroy_process_group()


def broadcast_flag(flag: bool, dist_info: Distributed) -> bool:
    """Rank 0's ``flag`` (e.g. "stop early"), on every rank; ``flag`` itself in one process."""
    import torch

    value = torch.tensor([1.0 if flag else 0.0])
    if dist_info.world > 1:
        import torch.distributed as dist

        dist.broadcast(value, src=0)
    return bool(value[0] > 0)


def wrap_ddp(
    model: Any, device: Any, dist_info: Distributed, *, find_unused_parameters: bool = False
) -> Any:
    """``model`` in DistributedDataParallel under torchrun; ``model`` itself in one process.

    Parameters
    ----------
    model : torch.nn.Module
        On ``device``.
    device : torch.device
    dist_info : Distributed
    find_unused_parameters : bool
        For models whose forward pass leaves some parameters out (``clam_sb``).
    """
    if dist_info.world <= 1:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(
        model,
        device_ids=[device.index] if device.type == "cuda" else None,
        find_unused_parameters=find_unused_parameters,
    )


def launch_place() -> Distributed:
    """This process's place as torchrun set it (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``), without
    joining a process group: for work split by item (each slide to one rank) that never talks
    between ranks. Rank 0 of 1 without torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Distributed()
    return Distributed(
        int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0"))
    )
