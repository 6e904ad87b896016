"""Data parallelism over the tasks of a meta-batch, under torchrun (or a single process).

Every rank draws the same global meta-batch from the same generator, keeps its contiguous share of
the tasks, and the meta-gradients are averaged with one all-reduce, weighted by the number of tasks
each rank had. Rank 0 alone writes logs, TensorBoard, checkpoints and results; every rank reads
the run directory (to resume), so it has to be on a filesystem all nodes share.
"""

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, TypeVar

import torch
import torch.distributed as dist

from imaml_cli.data import TaskBatch
from imaml_cli.errors import UserError

T = TypeVar("T")


def world_from_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) as torchrun sets them; (0, 1, 0) for a plain process."""
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
            int(os.environ.get("LOCAL_RANK", 0)))


@dataclass
class Distributed:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def start(cls, device: torch.device) -> "Distributed":
        """Join torchrun's process group (NCCL on GPUs, gloo on CPUs); each rank gets its own GPU."""
        rank, world, local_rank = world_from_env()
        if world == 1:
            return cls(device=device)
        if device.type == "cuda":
            if local_rank >= torch.cuda.device_count():
                raise UserError(f"torchrun started more processes on this node than it has GPUs "
                                f"({torch.cuda.device_count()}); use --nproc_per_node={torch.cuda.device_count()}")
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
        owns_group = not dist.is_initialized()
        if owns_group:
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                    device_id=device if device.type == "cuda" else None)
        return cls(rank, world, local_rank, device, owns_group)

    def shard(self, batch: TaskBatch) -> tuple[TaskBatch, int, int]:
        """This rank's tasks of the global batch, with their count and the global count."""
        total = batch.support_x.shape[0]
        if total < self.world:
            raise UserError(f"train.meta_batch_size={total} is smaller than the {self.world} processes; "
                            "each needs at least one task of a meta-batch")
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

    def maximum(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The largest of the ranks' values, per entry (in place when distributed)."""
        if self.world > 1:
            for value in tensors.values():
                dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return tensors

    def largest(self, value: int) -> int:
        """The largest of the ranks' values: a signal that reached any rank stops all at the same step."""
        if self.world == 1:
            return value
        tensor = torch.tensor(value, device=self.device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return int(tensor.item())

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

    def shared_folder(self, folder: Path) -> Path:
        """Rank 0's ``folder``, created there; every rank must see it, as they read checkpoints from it.

        Under torchrun only rank 0's Hydra chose a run directory; the other ranks learn it here.
        """
        if self.world == 1:
            return folder
        chosen = [str(folder)]
        if self.is_main:
            folder.mkdir(parents=True, exist_ok=True)
        dist.broadcast_object_list(chosen, src=0)
        folder = Path(chosen[0])
        seen = [None] * self.world
        dist.all_gather_object(seen, folder.is_dir())
        if not all(seen):
            raise UserError(f"rank {seen.index(False)} cannot see the run directory {folder}; "
                            "put hydra.run.dir on a filesystem that every node shares")
        return folder

    def main_first(self, build: Callable[[], T]) -> T:
        """``build()`` on rank 0, then on the first rank of each other node, then on the rest.

        A dataset cache is so built once when the nodes share it (once per node when they do not),
        and the other ranks load it instead of all decoding the data at the same time.
        """
        if self.world == 1:
            return build()
        turns = (self.rank == 0, self.local_rank == 0 and self.rank != 0, self.local_rank != 0)
        for mine in turns:
            if mine:
                built = build()
            self.barrier()
        return built

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def close(self) -> None:
        if self.owns_group:
            dist.destroy_process_group()
