"""evaluate(): the published mean and 95% CI, computed by hand from known per-episode scores."""

import math
import statistics

import pytest
import torch

from imaml_cli.data import TaskBatch
from imaml_cli.engine.evaluation import evaluate

# Per-episode query scores after adaptation, and different ones before it (as fractions for
# classification, MSE for regression).
POST = [0.6, 0.8, 1.0, 0.4, 0.8, 0.6, 1.0]
PRE = [0.2, 0.2, 0.4, 0.2, 0.0, 0.2, 0.4]
POST_MSE = [0.31, 0.05, 0.92, 0.44, 0.17, 0.26, 0.08]
PRE_MSE = [2.5, 3.1, 1.9, 2.2, 4.0, 2.8, 3.3]


class NumberedEpisodes:
    """An episode source whose episodes carry their index in support_x, in the order drawn."""

    shots, queries, ways = 1, 3, 5

    def __init__(self, kind):
        self.kind = kind
        self.drawn = 0

    def sample(self, num_tasks, generator):
        index = torch.arange(self.drawn, self.drawn + num_tasks)
        self.drawn += num_tasks
        return TaskBatch(index, index, index, index)


class ScriptedLearner:
    """Gives episode i the i-th entry of each scripted metric (float64, so the sums are exact)."""

    def __init__(self, **metrics):
        self.metrics = {name: torch.tensor(values, dtype=torch.float64) for name, values in metrics.items()}

    def adapt(self, theta, batch):
        return None, {name: values[batch.support_x] for name, values in self.metrics.items()}


# A classifier's scores: the losses are there to be ignored.
CLASSIFIER = ScriptedLearner(post_query_accuracy=POST, pre_query_accuracy=PRE, post_query_loss=POST_MSE,
                             pre_query_loss=PRE_MSE)
REGRESSOR = ScriptedLearner(post_query_loss=POST_MSE, pre_query_loss=PRE_MSE)


def expected(scores):
    n = len(scores)
    return statistics.fmean(scores), 1.96 * statistics.stdev(scores) / math.sqrt(n)


def test_accuracy_is_the_mean_post_adaptation_score_with_a_sample_std_confidence_interval():
    # 7 episodes in batches of 3: the last batch is short.
    result = evaluate(CLASSIFIER, {}, NumberedEpisodes("classification"), episodes=7, seed=0,
                      batch_size=3, split="test")
    percent = [100 * p for p in POST]
    mean, ci95 = expected(percent)
    assert result.per_episode == pytest.approx(percent, abs=1e-12)
    assert (result.metric, result.episodes, result.ways) == ("accuracy", 7, 5)
    assert result.mean == pytest.approx(mean, rel=1e-12)  # 74.2857..., not the pre-adaptation 22.857...
    # 1.96·s/√n with the n − 1 sample deviation: 16.49; the population deviation would give 15.26,
    # s/n 6.23.
    assert result.ci95 == pytest.approx(ci95, rel=1e-12)
    assert result.ci95 != pytest.approx(1.96 * statistics.pstdev(percent) / math.sqrt(7), rel=1e-3)


def test_regression_averages_the_post_adaptation_mse():
    result = evaluate(REGRESSOR, {}, NumberedEpisodes("regression"), episodes=7, seed=0,
                      batch_size=4, split="val")
    mean, ci95 = expected(POST_MSE)
    assert result.metric == "mse" and result.split == "val"
    assert result.per_episode == pytest.approx(POST_MSE, abs=1e-12)
    assert result.mean == pytest.approx(mean, rel=1e-12)
    assert result.ci95 == pytest.approx(ci95, rel=1e-12)


def test_the_line_prints_the_mean_and_the_half_width():
    result = evaluate(CLASSIFIER, {}, NumberedEpisodes("classification"), episodes=7, seed=0,
                      batch_size=7, split="test")
    mean, ci95 = expected([100 * p for p in POST])
    assert result.line().startswith(f"test accuracy {mean:.2f}% ± {ci95:.2f} (95% CI, 7 episodes, 5-way 1-shot")
