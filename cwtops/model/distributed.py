"""Data-parallel training with `torchrun` (DDP): one process per device, or several on a CPU (gloo).

`torchrun --nproc_per_node N -m flows.cli stage train` sets RANK / WORLD_SIZE / LOCAL_RANK; the
train stage reads them here. Every process draws the same seeded order and takes its share of each
global batch, so a step sees the same `train.batch_size` signals as a single process and the
learning-rate schedule is unchanged. Held in memory (a small set) every process keeps the whole
scalogram set; streamed, each reads only its share of every batch and of the validation split. Gradients are averaged by DDP; after
each epoch rank 0's buffers (BatchNorm statistics) are broadcast, so every rank evaluates the
same model and takes the same early-stopping decision. Only rank 0 writes files.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


SINGLE_PROCESS = World()


def init_world(cuda: bool) -> World:
    """The process group torchrun describes in the environment; a single process otherwise."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return SINGLE_PROCESS
    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        if cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if cuda else "gloo")
    return World(dist.get_rank(), dist.get_world_size(), local_rank)


def close_world(world: World) -> None:
    if world.distributed:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()


class HeadModule(nn.Module):
    """The trainable head as a module whose forward is `model.training_head`: what DDP wraps.

    The frozen filter bank stays outside, so DDP neither hooks nor broadcasts it."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.parts = nn.ModuleList([module for name, module in model.named_children() if name != "frontend"])
        self._head = model.training_head

    def forward(self, scalogram: torch.Tensor) -> torch.Tensor:
        return self._head(scalogram)


def wrap_head(model: nn.Module, world: World) -> nn.Module:
    """`model.training_head` itself on one process; a DDP-wrapped head module under torchrun."""
    if not world.distributed:
        return model.training_head
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [world.local_rank] if next(model.parameters()).is_cuda else None
    return DistributedDataParallel(HeadModule(model), device_ids=device_ids, broadcast_buffers=False)


def shard(batch: torch.Tensor, world: World) -> torch.Tensor:
    """This rank's share of a global batch (indices), interleaved so shares differ by at most one."""
    return batch[world.rank :: world.size] if world.distributed else batch


def sync_buffers(model: nn.Module, world: World) -> None:
    """Rank 0's buffers everywhere (BatchNorm running statistics drift apart per rank)."""
    if world.distributed:
        import torch.distributed as dist

        for buffer in model.buffers():
            dist.broadcast(buffer, 0)


def threads_per_rank(cores: int, world: World) -> int:
    return max(1, cores // world.size)
