"""Full-tensor views of parameters that FSDP2 (``fully_shard``) may have sharded into DTensors.

Outside a forward pass an FSDP2 module's parameters are DTensors holding one shard per rank. The switch, the
export and saving need the whole tensor: :func:`full` all-gathers it (a collective: every rank must call it
in the same order), and :func:`assign` writes a whole tensor back by keeping each rank's own shard. For
ordinary tensors both are plain reads and copies.
"""

from __future__ import annotations

import torch

try:
    from torch.distributed.tensor import DTensor, distribute_tensor
except ImportError:  # pragma: no cover - torch builds without distributed support
    DTensor = ()
    distribute_tensor = None


def is_sharded(t: torch.Tensor) -> bool:
    return isinstance(DTensor, type) and isinstance(t, DTensor)


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor (all-gathered if it is a DTensor), detached."""
    t = t.detach()
    return t.full_tensor() if is_sharded(t) else t


def assign(target: torch.Tensor, value: torch.Tensor) -> None:
    """``target[...] = value`` for a whole-tensor ``value``; a DTensor keeps just its own shard of it."""
    with torch.no_grad():
        if is_sharded(target):
            local = distribute_tensor(value.to(target.dtype), target.device_mesh, target.placements).to_local()
            target.to_local().copy_(local)
        else:
            target.copy_(value)


def rank_and_world() -> tuple[int, int]:
    """``(rank, world size)`` of this process: ``(0, 1)`` outside a distributed run."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_writer() -> bool:
    """Whether this process writes shared files: rank 0 of a distributed run, or the only process."""
    return rank_and_world()[0] == 0
