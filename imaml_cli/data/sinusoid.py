"""Sinusoid regression tasks of Finn et al. (2017): y = A sin(x - phase)."""

from __future__ import annotations

import math

import torch

from imaml_cli.data.episodes import SPLITS, TaskBatch, check_positive, check_split
from imaml_cli.errors import UserError


class SinusoidTasks:
    """Tasks with amplitude, phase and inputs drawn uniformly from the given ranges.

    Every task is generated from a seed of its own, ``3 s + i`` for split number ``i`` and an
    ``s`` drawn from the caller's generator: the splits' seeds never coincide, so validation and
    test never see a training task, nor each other's, whatever seeds the caller uses.
    """

    kind = "regression"
    input_shape = (1,)

    def __init__(self, shots: int, queries: int, amplitude: tuple[float, float] = (0.1, 5.0),
                 phase: tuple[float, float] = (0.0, math.pi),
                 x_range: tuple[float, float] = (-5.0, 5.0),
                 device: torch.device | str = "cpu", split: str = "train"):
        self.split_index = SPLITS.index(check_split(split))
        self.shots = check_positive(shots, "dataset.shots")
        self.queries = check_positive(queries, "dataset.queries")
        for name, (low, high) in (("amplitude", amplitude), ("phase", phase),
                                  ("x_range", x_range)):
            if not low <= high:
                raise UserError(f"dataset.{name}=[{low}, {high}] is an empty range; "
                                f"give it as [low, high] with low <= high")
        self.amplitude, self.phase, self.x_range = amplitude, phase, x_range
        self.device = torch.device(device)

    def sample(self, num_tasks: int, generator: torch.Generator) -> TaskBatch:
        k = self.shots
        seeds = torch.randint(2 ** 60, (num_tasks,), generator=generator) * len(SPLITS) + self.split_index
        u = torch.stack([torch.rand(2 + k + self.queries, generator=torch.Generator().manual_seed(int(seed)))
                         for seed in seeds])
        amplitude = _scale(u[:, :1], self.amplitude)
        phase = _scale(u[:, 1:2], self.phase)
        x = _scale(u[:, 2:], self.x_range)
        y = amplitude * torch.sin(x - phase)
        x, y = x.unsqueeze(2).to(self.device), y.unsqueeze(2).to(self.device)
        return TaskBatch(*(t.contiguous() for t in (x[:, :k], y[:, :k], x[:, k:], y[:, k:])))


def _scale(u: torch.Tensor, bounds: tuple[float, float]) -> torch.Tensor:
    low, high = bounds
    return low + (high - low) * u
