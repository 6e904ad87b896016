"""Data parallelism over the tasks of a meta-batch, under torchrun (or a single process).

Every rank draws the same global meta-batch from the same generator, keeps its contiguous share of
the tasks, and the meta-gradients are averaged with one all-reduce, weighted by the number of tasks
each rank had. Rank 0 alone writes logs, TensorBoard, checkpoints and results.
"""

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from imaml_cli.data import TaskBatch


def world_from_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) as torchrun sets them; (0, 1, 0) for a plain process."""
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
            int(os.environ.get("LOCAL_RANK", 0)))


@dataclass
class Distributed:
    rank: int = 0
    world: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def start(cls, device: torch.device) -> "Distributed":
        rank, world, _ = world_from_env()
        if world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        return cls(rank, world)

    def shard(self, batch: TaskBatch) -> tuple[TaskBatch, int, int]:
        """This rank's tasks of the global batch, with their count and the global count."""
        total = batch.support_x.shape[0]
        bounds = [total * r // self.world for r in range(self.world + 1)]
        part = slice(bounds[self.rank], bounds[self.rank + 1])
        return TaskBatch(*(t[part] for t in batch)), bounds[self.rank + 1] - bounds[self.rank], total

    def average(self, tensors: dict[str, torch.Tensor], local: int, total: int) -> dict[str, torch.Tensor]:
        """The global mean of per-rank means over ``local`` of ``total`` tasks (in place when distributed)."""
        if self.world == 1:
            return tensors
        for value in tensors.values():
            value.mul_(local / total)
            dist.all_reduce(value)
        return tensors

    def gather_lists(self, values: list[torch.Tensor]) -> list[torch.Tensor]:
        """Every rank's list of per-batch tensors, interleaved back into the single-process order."""
        if self.world == 1:
            return values
        everyone = [None] * self.world
        dist.all_gather_object(everyone, [v.cpu() for v in values])
        merged = []
        for i in range(max(len(v) for v in everyone)):
            merged.extend(v[i] for v in everyone if i < len(v))
        return merged

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def close(self) -> None:
        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()
