"""Episode sampling: structure, reproducibility, validation; sinusoid tasks; the factory."""

import math

import pytest
import torch

from imaml_cli.data import (ClassificationEpisodes, SinusoidTasks, TaskBatch, default_cache_dir,
                            fixed_episodes, make_episode_source)
from imaml_cli.errors import UserError

CLASSES, PER_CLASS = 12, 7


def tagged_images() -> torch.Tensor:
    """Images whose pixel (0, 0) holds the class and pixel (0, 1) the index within the class."""
    images = torch.zeros(CLASSES, PER_CLASS, 1, 4, 4, dtype=torch.uint8)
    images[:, :, 0, 0, 0] = torch.arange(CLASSES).view(-1, 1)
    images[:, :, 0, 0, 1] = torch.arange(PER_CLASS)
    return images


def tags(x: torch.Tensor):
    raw = (x * 255).round().long()
    return raw[..., 0, 0, 0], raw[..., 0, 0, 1]


def test_episode_structure():
    n, k, q, t = 4, 2, 3, 50
    source = ClassificationEpisodes(tagged_images(), n, k, q)
    batch = source.sample(t, torch.Generator().manual_seed(0))
    assert batch.support_x.shape == (t, n * k, 1, 4, 4) and batch.support_x.dtype == torch.float32
    assert batch.query_x.shape == (t, n * q, 1, 4, 4)
    assert batch.support_y.dtype == torch.int64
    assert torch.equal(batch.support_y[3], torch.arange(n).repeat_interleave(k))
    assert torch.equal(batch.query_y[3], torch.arange(n).repeat_interleave(q))
    s_class, s_index = tags(batch.support_x)
    q_class, q_index = tags(batch.query_x)
    for task in range(t):
        label_class = [s_class[task][batch.support_y[task] == label].unique() for label in range(n)]
        assert all(len(c) == 1 for c in label_class)  # one class per label
        assert len(set(int(c) for c in label_class)) == n  # N distinct classes
        for label in range(n):
            assert (q_class[task][batch.query_y[task] == label] == label_class[label]).all()
            seen = torch.cat([s_index[task][batch.support_y[task] == label],
                              q_index[task][batch.query_y[task] == label]])
            assert len(seen.unique()) == k + q  # no image twice in an episode
    # Labels go to classes in a random order, and every class gets drawn.
    first_class = s_class[:, 0]
    assert len(first_class.unique()) > 3
    assert len(s_class.unique()) == CLASSES


def test_same_seed_same_episodes_and_batch_size_does_not_matter():
    source = ClassificationEpisodes(tagged_images(), 3, 1, 2)
    whole = list(fixed_episodes(source, 10, seed=7, batch_size=10))
    pieces = list(fixed_episodes(source, 10, seed=7, batch_size=3))
    assert [len(b.support_x) for b in pieces] == [3, 3, 3, 1]
    for field in range(4):
        assert torch.equal(whole[0][field], torch.cat([b[field] for b in pieces]))
    other = next(fixed_episodes(source, 10, seed=8, batch_size=10))
    assert not torch.equal(whole[0].support_x, other.support_x)


def test_fixed_episodes_leave_the_training_generator_alone():
    source = SinusoidTasks(5, 5)
    train = torch.Generator().manual_seed(1)
    state = train.get_state()
    assert sum(len(b.support_x) for b in fixed_episodes(source, 9, seed=0, batch_size=4)) == 9
    assert torch.equal(train.get_state(), state)


def test_normalisation():
    images = torch.full((2, 3, 3, 2, 2), 51, dtype=torch.uint8)  # 0.2 after scaling
    source = ClassificationEpisodes(images, 2, 1, 1, mean=(0.2, 0.1, 0.0), std=(1.0, 0.5, 0.4))
    x = source.sample(1, torch.Generator()).support_x[0, 0]
    assert torch.allclose(x[:, 0, 0], torch.tensor([0.0, 0.2, 0.5]), atol=1e-6)  # float32 rounding


@pytest.mark.parametrize("ways, shots, queries, message", [
    (13, 1, 1, r"dataset.ways=13 but the toy 'val' split has only 12 classes; lower dataset.ways"),
    (2, 5, 3, r"dataset.shots=5 \+ dataset.queries=3 = 8 but the toy 'val' split has only 7 "
              r"images per class; lower dataset.shots or dataset.queries"),
    (0, 1, 1, r"dataset.ways must be a positive integer, got 0"),
    (2, 1.5, 1, r"dataset.shots must be a positive integer, got 1.5"),
    (2, 1, -1, r"dataset.queries must be a positive integer, got -1"),
])
def test_conflicting_numbers_are_named(ways, shots, queries, message):
    with pytest.raises(UserError, match=message):
        ClassificationEpisodes(tagged_images(), ways, shots, queries, name="the toy 'val' split")


def test_sinusoid_tasks():
    source = SinusoidTasks(shots=10, queries=7)
    batch = source.sample(64, torch.Generator().manual_seed(3))
    assert (source.kind, source.input_shape) == ("regression", (1,))
    assert batch.support_x.shape == batch.support_y.shape == (64, 10, 1)
    assert batch.query_x.shape == (64, 7, 1) and batch.query_y.dtype == torch.float32
    x = torch.cat([batch.support_x, batch.query_x], 1).squeeze(2).double()
    y = torch.cat([batch.support_y, batch.query_y], 1).squeeze(2).double()
    assert x.min() >= -5 and x.max() <= 5
    # A sin(x - p) = a sin x + b cos x with a = A cos p, b = -A sin p: support and query share it.
    basis = torch.stack([torch.sin(x), torch.cos(x)], dim=2)
    coef = torch.linalg.lstsq(basis, y.unsqueeze(2)).solution.squeeze(2)
    # The targets are float32 (rounding about 5e-7 at amplitude 5): a fit exact to 1e-4, whereas
    # support and query from different sinusoids would miss by order 1.
    assert torch.allclose(basis @ coef.unsqueeze(2), y.unsqueeze(2), atol=1e-4)
    amplitude = coef.norm(dim=1)
    phase = torch.atan2(-coef[:, 1], coef[:, 0])
    assert amplitude.min() >= 0.1 - 1e-4 and amplitude.max() <= 5 + 1e-4
    assert phase.min() >= -1e-4 and phase.max() <= math.pi + 1e-4
    assert amplitude.std() > 0.5  # tasks differ


def test_sinusoid_is_seeded_and_validated():
    source = SinusoidTasks(shots=5, queries=5)
    a = source.sample(4, torch.Generator().manual_seed(0))
    b = source.sample(4, torch.Generator().manual_seed(0))
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    with pytest.raises(UserError, match=r"dataset.amplitude=\[5, 1\] is an empty range"):
        SinusoidTasks(5, 5, amplitude=(5, 1))
    with pytest.raises(UserError, match="dataset.shots must be a positive integer, got 0"):
        SinusoidTasks(0, 5)


def test_task_batch_to():
    batch = SinusoidTasks(2, 3).sample(2, torch.Generator().manual_seed(0))
    same = batch.to("cpu")
    assert isinstance(same, TaskBatch) and all(torch.equal(a, b) for a, b in zip(same, batch))
    # The meta device holds shapes and dtypes only: a move off the CPU that needs no accelerator.
    moved = batch.to("meta")
    assert isinstance(moved, TaskBatch) and all(t.device.type == "meta" for t in moved)
    assert [(t.shape, t.dtype) for t in moved] == [(t.shape, t.dtype) for t in batch]
    assert moved.support_x.shape == (2, 2, 1) and moved.query_x.shape == (2, 3, 1)


def test_factory():
    source = make_episode_source("sinusoid", "val", root=None, ways=5, shots=3, queries=4,
                                 device="cpu")
    assert isinstance(source, SinusoidTasks) and source.shots == 3
    with pytest.raises(UserError, match="unknown dataset.name 'cifar'; choose one of omniglot"):
        make_episode_source("cifar", "train", root=None, ways=5, shots=1, queries=1, device="cpu")
    with pytest.raises(UserError, match="dataset.root is not set"):
        make_episode_source("omniglot", "train", root=None, ways=5, shots=1, queries=1,
                            device="cpu")


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("IMAML_CACHE_DIR", str(tmp_path / "a"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "b"))
    assert default_cache_dir() == tmp_path / "a"
    monkeypatch.delenv("IMAML_CACHE_DIR")
    assert default_cache_dir() == tmp_path / "b" / "imaml"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "imaml"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_same_episodes_on_cpu_and_cuda():
    images = tagged_images()
    cpu = ClassificationEpisodes(images, 3, 2, 2).sample(5, torch.Generator().manual_seed(4))
    gpu = ClassificationEpisodes(images.cuda(), 3, 2, 2).sample(5, torch.Generator().manual_seed(4))
    assert gpu.support_x.is_cuda
    assert all(torch.equal(u, v.cpu()) for u, v in zip(cpu, gpu))
