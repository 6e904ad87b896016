"""Meta-test: adapt to fixed episodes and report the mean with a 95% confidence interval."""

import math
from dataclasses import asdict, dataclass

import torch

from imaml_cli.data import fixed_episodes
from imaml_cli.meta.algorithms import MetaLearner
from imaml_cli.meta.tree import Params


@dataclass
class EvalResult:
    metric: str              # "accuracy" (classification, in %) or "mse" (regression)
    mean: float
    ci95: float              # half-width: 1.96 standard errors of the mean (see evaluate)
    episodes: int
    split: str
    ways: int
    shots: int
    per_episode: list[float]
    queries: int | None = None  # query examples per class (per task for regression); None in older results
    # iMAML: the median over episodes of ‖∇G(φ)‖, how far adaptation left φ from the inner
    # problem's minimiser (README, "Is the inner problem solved?"); None for the other algorithms.
    inner_grad_norm_median: float | None = None

    def line(self) -> str:
        protocol = f"{self.shots}-shot"
        if self.queries is not None:
            per = "per class" if self.metric == "accuracy" else "per task"
            protocol += f", {self.queries} quer{'y' if self.queries == 1 else 'ies'} {per}"
        if self.metric == "accuracy":
            return (f"{self.split} accuracy {self.mean:.2f}% ± {self.ci95:.2f} (95% CI, {self.episodes} episodes, "
                    f"{self.ways}-way {protocol})")
        return f"{self.split} MSE {self.mean:.4f} ± {self.ci95:.4f} (95% CI, {self.episodes} episodes, {protocol})"

    def to_dict(self) -> dict:
        return asdict(self)


def evaluate(learner: MetaLearner, theta: Params, source, *, episodes: int, seed: int, batch_size: int,
             split: str, shard: tuple[int, int] = (0, 1), gather=None, progress: bool = False) -> EvalResult:
    """Adapt θ to ``episodes`` fixed episodes of ``source`` (the same ones for the same seed).

    Each episode is scored after adaptation (``post_query_*``): the query accuracy in % or the query
    MSE. The result is their mean and a 95% confidence interval of the mean, 1.96·s/√n, where s is
    the sample standard deviation (n − 1 in the denominator): the episodes are a random sample of
    the task distribution whose spread is estimated from them, and dividing by n would understate
    it. 1.96 is the normal quantile, as the papers report; at the usual 600 episodes Student's t
    (1.964) differs in the third digit. One episode gives no estimate of the spread; its ci95 is 0.

    ``shard=(rank, world)`` keeps every world-th batch for this rank; ``gather`` combines the
    per-rank lists of scores in episode order, so several processes report what one would.
    ``progress``: a tqdm bar over this rank's episodes (a test of 600 episodes takes minutes on a CPU).
    """
    classification = source.kind == "classification"
    rank, world = shard
    scores, inner_grad_norms = [], []
    from tqdm import tqdm

    bar = tqdm(total=episodes, desc=f"{split} episodes", unit="episode", dynamic_ncols=True, disable=not progress,
               mininterval=1.0)
    for index, batch in enumerate(fixed_episodes(source, episodes, seed, batch_size)):
        if index % world != rank:
            continue
        _, metrics = learner.adapt(theta, batch)
        # Under torchrun, rank 0's share times the number of ranks: an estimate of the whole.
        bar.update(min(len(metrics["post_query_loss"]) * world, episodes - bar.n))
        if classification:
            # A fraction of the episode's queries, recovered exactly from float32's (whose 0.6 would
            # print as 60.000003814697266).
            queries = source.ways * source.queries
            per_task = (metrics["post_query_accuracy"].double() * queries).round() * 100.0 / queries
        else:
            per_task = metrics["post_query_loss"].double()
        scores.append(per_task.cpu())
        if "inner_grad_norm" in metrics:
            inner_grad_norms.append(metrics["inner_grad_norm"].double().cpu())
    bar.close()
    if gather is not None:
        scores, inner_grad_norms = gather(scores), gather(inner_grad_norms)
    values = torch.cat(scores) if scores else torch.zeros(0, dtype=torch.float64)
    std = values.std(correction=1).item() if len(values) > 1 else 0.0
    return EvalResult("accuracy" if classification else "mse", values.mean().item(),
                      1.96 * std / math.sqrt(max(len(values), 1)), len(values), split,
                      getattr(source, "ways", 1), source.shots, values.tolist(), source.queries,
                      torch.cat(inner_grad_norms).median().item() if inner_grad_norms else None)
