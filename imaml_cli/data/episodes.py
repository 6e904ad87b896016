"""Few-shot episodes sampled a whole meta-batch at a time by tensor indexing.

Random numbers come from a CPU ``torch.Generator`` so a seed gives the same episodes on every
device; only the gather runs on the images' device. Each task consumes a fixed-length slice of
the generator's stream, so a seed gives the same tasks whatever the meta-batch size.
"""

from __future__ import annotations

from typing import Iterator, NamedTuple, Protocol, Sequence

import torch

from imaml_cli.errors import UserError

SPLITS = ("train", "val", "test")


class TaskBatch(NamedTuple):
    """Support and query sets of T tasks, stacked along a leading task dimension."""

    support_x: torch.Tensor
    support_y: torch.Tensor
    query_x: torch.Tensor
    query_y: torch.Tensor

    def to(self, device: torch.device | str) -> TaskBatch:
        return TaskBatch(*(t.to(device) for t in self))


class EpisodeSource(Protocol):
    kind: str
    input_shape: tuple[int, ...]

    def sample(self, num_tasks: int, generator: torch.Generator) -> TaskBatch: ...


def check_split(split: str, dataset: str = "") -> str:
    """Return ``split`` if it is one of ``SPLITS``, else raise a UserError naming them."""
    if split not in SPLITS:
        what = f"{dataset} split" if dataset else "split"
        raise UserError(f"unknown {what} {split!r}; choose one of {', '.join(SPLITS)}")
    return split


def check_positive(value: object, name: str) -> int:
    """Return ``value`` if it is a positive integer, else raise a UserError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"{name} must be a positive integer, got {value!r}")
    return value


class ClassificationEpisodes:
    """N-way K-shot episodes with Q queries per class from a ``[classes, n, C, H, W]`` uint8 set.

    With ``counts``, classes may differ in size: ``images`` is ``[n, C, H, W]``, the images of
    class 0 first, ``counts[c]`` of class c. Labels 0..N-1 go to the task's classes in a random
    order. Pixels are scaled to [0, 1] and, when ``mean``/``std`` are given, normalised per channel.
    """

    kind = "classification"

    def __init__(self, images: torch.Tensor, ways: int, shots: int, queries: int,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                 device: torch.device | str | None = None, name: str = "the dataset",
                 counts: Sequence[int] | None = None):
        self.ways = check_positive(ways, "dataset.ways")
        self.shots = check_positive(shots, "dataset.shots")
        self.queries = check_positive(queries, "dataset.queries")
        if counts is None:
            counts = [images.shape[1]] * images.shape[0]
            images = images.flatten(0, 1)
        self._counts = torch.tensor(counts, dtype=torch.long)
        if int(self._counts.sum()) != images.shape[0]:
            raise ValueError(f"counts add up to {int(self._counts.sum())} images, not the {images.shape[0]} given")
        num_classes, per_class, fewest = len(counts), max(counts), min(counts)
        if ways > num_classes:
            raise UserError(f"dataset.ways={ways} but {name} has only {num_classes} classes; "
                            f"lower dataset.ways")
        if shots + queries > fewest:
            raise UserError(f"dataset.shots={shots} + dataset.queries={queries} = "
                            f"{shots + queries} but {name} has only {fewest} images "
                            f"{'per class' if fewest == per_class else 'in its smallest class'}; "
                            f"lower dataset.shots or dataset.queries")
        self.device = torch.device(device) if device is not None else images.device
        self.input_shape = tuple(images.shape[1:])
        self.num_classes, self.per_class = num_classes, per_class
        self._uneven = fewest != per_class
        self._offsets = self._counts.cumsum(0) - self._counts
        self._images = images.to(self.device)
        # x_float = x_uint8 * scale - shift applies [0, 1] scaling and normalisation in one pass.
        channels = self.input_shape[0]
        mean_t = torch.tensor(mean if mean is not None else [0.0] * channels)
        std_t = torch.tensor(std if std is not None else [1.0] * channels)
        self._scale = (1.0 / (255.0 * std_t)).view(channels, 1, 1).to(self.device)
        self._shift = (mean_t / std_t).view(channels, 1, 1).to(self.device)

    def sample(self, num_tasks: int, generator: torch.Generator) -> TaskBatch:
        n, k, q = self.ways, self.shots, self.queries
        u = torch.rand(num_tasks, self.num_classes + n * self.per_class, generator=generator)
        # The top-N of i.i.d. uniforms is a uniformly random N-subset in uniformly random order.
        classes = u[:, :self.num_classes].topk(n, dim=1).indices
        draws = u[:, self.num_classes:].view(num_tasks, n, self.per_class)
        if self._uneven:
            # Slots past a class's own count rank below every real image, so topk never picks them.
            draws = draws.masked_fill(torch.arange(self.per_class) >= self._counts[classes].unsqueeze(2), -1.0)
        picks = draws.topk(k + q, dim=2)
        flat = (self._offsets[classes].unsqueeze(2) + picks.indices).to(self.device)
        labels = torch.arange(n, device=self.device)
        return TaskBatch(
            self._gather(flat[:, :, :k]),
            labels.repeat_interleave(k).expand(num_tasks, -1).contiguous(),
            self._gather(flat[:, :, k:]),
            labels.repeat_interleave(q).expand(num_tasks, -1).contiguous(),
        )

    def _gather(self, index: torch.Tensor) -> torch.Tensor:
        # index_select is several times faster than advanced indexing here.
        x = self._images.index_select(0, index.reshape(-1)).float()
        x = x.mul_(self._scale).sub_(self._shift)
        return x.view(index.shape[0], -1, *self.input_shape)


def fixed_episodes(source: EpisodeSource, num_episodes: int, seed: int,
                   batch_size: int) -> Iterator[TaskBatch]:
    """The same ``num_episodes`` tasks for a given seed, in batches of at most ``batch_size``.

    Uses its own generator, so evaluating never advances the training generator.
    """
    check_positive(num_episodes, "the number of evaluation episodes")
    check_positive(batch_size, "the evaluation batch size")
    generator = torch.Generator().manual_seed(seed)
    for start in range(0, num_episodes, batch_size):
        yield source.sample(min(batch_size, num_episodes - start), generator)
