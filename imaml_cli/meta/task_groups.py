"""The tasks of a meta-batch in groups on concurrent CPU threads.

The batched passes give a CPU's cores work two ways: one op at a time over all tasks, each op
split across torch's intra-op threads, or whole groups of tasks at once, each on its own thread.
Matrix products split well either way, but the many elementwise passes between them are small
enough that an op spread over threads spends much of its time synchronising. Groups run every
op of a task on one thread from start to end, with nothing shared until the results are combined.
On the 2-core machine of BENCHMARKS.md an iMAML-GD meta-step of 32 tasks ran 5-10% faster as two
groups of 16 than as one batch on 2 intra-op threads (iMAML-HF: 15%); groups of 4 tasks were
slower than either (each op too small), hence ``MIN_GROUP``. Tuned there only: on many cores
``auto`` gives each group several intra-op threads, which was not measured.

Every task's computation is the same whichever group it is in, up to rounding that depends on how
many threads run its ops (which a discrete choice, such as a backtracking step accepted or not,
can turn into a different step). Only the hand-written passes (``models/fused.py``) run in groups:
``torch.func.vmap`` is not safe on concurrent threads (two vmaps at once mix up their batch
sizes), so the vmap paths always take a meta-batch as one batch.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Callable, TypeVar

import torch

from imaml_cli.data.episodes import TaskBatch

MIN_GROUP = 8  # tasks per group at least

Result = TypeVar("Result")


def group_count(tasks: int, groups: int) -> int:
    """How many groups ``tasks`` tasks make, at most ``groups`` and at least ``MIN_GROUP`` tasks each."""
    return max(1, min(groups, tasks // MIN_GROUP))


def split(tasks: TaskBatch, groups: int) -> list[TaskBatch]:
    """``tasks`` in ``groups`` consecutive parts, as equal as possible."""
    parts = [torch.tensor_split(t, groups) for t in tasks]
    return [TaskBatch(*fields) for fields in zip(*parts)]


def run_groups(fn: Callable[[TaskBatch], Result], tasks: TaskBatch, groups: int) -> list[Result]:
    """``fn`` on each group of ``tasks`` (``split``), the groups on concurrent threads that share
    torch's intra-op threads between them; the results in the groups' order."""
    parts = split(tasks, groups)
    if len(parts) == 1:
        return [fn(parts[0])]
    saved = torch.get_num_threads()
    per_group = max(1, saved // len(parts))

    def work(part: TaskBatch) -> Result:
        # OpenMP's and MKL's thread counts belong to the calling thread, but torch also keeps the
        # last count process-wide (threads started meanwhile inherit it): put back below.
        torch.set_num_threads(per_group)
        return fn(part)

    try:
        # The calling thread takes the first group itself, so every group has a thread of its own.
        with ThreadPoolExecutor(len(parts) - 1, thread_name_prefix="imaml-tasks") as pool:
            others = [pool.submit(work, part) for part in parts[1:]]
            first = work(parts[0])
            return [first] + [future.result() for future in others]
    finally:
        torch.set_num_threads(saved)
