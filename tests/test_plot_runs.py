import json
import math
import runpy
import sys
from pathlib import Path

import pytest

from conftest import QUICK, REPO, compose
from imaml_cli.engine import loop
from imaml_cli.engine.loop import train

pytest.importorskip("matplotlib")


def plot(*args):
    argv = sys.argv
    sys.argv = ["plot_runs.py", *map(str, args)]
    try:
        runpy.run_path(str(REPO / "scripts" / "plot_runs.py"), run_name="__main__")
    finally:
        sys.argv = argv


def test_plots_validation_curves_of_two_runs(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    from imaml_cli.engine.logging import TensorBoard

    validations, norms = {}, {}
    evaluate, scalars = loop.evaluate, TensorBoard.scalars
    for name, lam in (("a", 0.5), ("b", 2.0)):
        scores = validations[name] = []
        logged = norms[name] = {}

        def recording_scalars(board, prefix, values, step, logged=logged):
            if prefix == "train" and "inner_grad_norm" in values:
                logged[step] = values["inner_grad_norm"]
            return scalars(board, prefix, values, step)
        monkeypatch.setattr(TensorBoard, "scalars", recording_scalars)

        def recording(*args, scores=scores, **kwargs):
            result = evaluate(*args, **kwargs)
            if result.split == "val":
                scores.append(result.mean)
            return result
        monkeypatch.setattr(loop, "evaluate", recording)
        train(compose(QUICK + [f"algorithm.lam={lam}", "train.log_every=1"]), tmp_path / name)
    saved = []
    save = Figure.savefig

    def keep_and_save(figure, *args, **kwargs):
        saved.append(figure)
        return save(figure, *args, **kwargs)
    monkeypatch.setattr(Figure, "savefig", keep_and_save)
    out = tmp_path / "plot.png"
    plot(tmp_path / "a", tmp_path / "b", "--labels", "lam 0.5", "lam 2", "--out", out,
         "--measures", "train/inner_grad_norm")

    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (figure,) = saved
    by_step, by_time, grad_norm = figure.axes
    # The measurement panel: each run's ‖∇G(φ)‖ as training logged it, at the steps it logged it.
    assert grad_norm.get_ylabel() == "train/inner_grad_norm"
    for line, name in zip(grad_norm.lines, "ab"):
        assert list(line.get_xdata()) == sorted(norms[name]) and len(norms[name]) >= 2
        assert list(line.get_ydata()) == pytest.approx([norms[name][k] for k in sorted(norms[name])], rel=1e-6)
    assert by_step.get_ylabel() == by_time.get_ylabel() == "validation MSE"
    # One curve per run, each the run's own validations (QUICK validates at steps 2 and 4), as
    # TensorBoard stores them (float32).
    assert [line.get_label() for line in by_step.lines] == ["lam 0.5", "lam 2"]
    for line, name in zip(by_step.lines, "ab"):
        assert list(line.get_xdata()) == [2, 4]
        assert list(line.get_ydata()) == pytest.approx(validations[name], rel=1e-6)
    assert validations["a"] != pytest.approx(validations["b"], rel=1e-3)
    for line, twin in zip(by_time.lines, by_step.lines):
        minutes = list(line.get_xdata())
        assert list(line.get_ydata()) == list(twin.get_ydata()) and 0 < minutes[0] < minutes[1]


def test_plots_the_curves_published_rows_keep(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    curve = {"metric": "val/accuracy", "steps": [100, 200, 300], "values": [80.5, 91.25, 92.0],
             "train_seconds": [60.0, 150.0, None]}  # null: a validation whose time the run did not log
    rows = [{"dataset": "omniglot", "algorithm": "imaml", "inner_solver": "gd", "ways": 5, "shots": 1, "validation": curve},
            {"dataset": "omniglot", "algorithm": "maml", "inner_solver": "gd", "ways": 5, "shots": 1}]  # no curve kept
    results = tmp_path / "results.json"
    results.write_text(json.dumps(rows))
    saved = []
    save = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda figure, *a, **k: (saved.append(figure), save(figure, *a, **k)))
    plot("--results", results, "--out", tmp_path / "plot.png")
    by_step, by_time = saved[0].axes
    (line,) = by_step.lines
    assert line.get_label() == "omniglot 5-way 1-shot iMAML-GD"
    assert list(line.get_xdata()) == [100, 200, 300] and list(line.get_ydata()) == [80.5, 91.25, 92.0]
    assert list(by_time.lines[0].get_xdata()[:2]) == [1.0, 2.5] and math.isnan(by_time.lines[0].get_xdata()[2])
    with pytest.raises(SystemExit, match="--measures needs run directories"):
        plot("--results", results, "--measures", "train/inner_grad_norm", "--out", tmp_path / "plot.png")


def test_a_measure_the_run_did_not_log_is_named(tmp_path):
    train(compose(QUICK), tmp_path / "run")
    with pytest.raises(SystemExit, match="has no scalar 'train/nonsense'; it has .*train/inner_grad_norm"):
        plot(tmp_path / "run", "--measures", "train/nonsense", "--out", tmp_path / "x.png")


def test_a_folder_that_is_not_a_run_is_named(tmp_path):
    with pytest.raises(SystemExit, match=f"{tmp_path} has no tb/ folder"):
        plot(tmp_path)


def test_a_run_that_never_validated_has_no_curve_to_publish(tmp_path):
    """publish_pretrained.py keeps a row's curve only where the run validated (train.val_every=0 runs
    publish without one); plot_runs.py names the missing scalars."""
    from torch.utils.tensorboard import SummaryWriter

    sys.path.insert(0, str(REPO / "scripts"))
    from plot_runs import read_events, read_validation

    with SummaryWriter(tmp_path / "tb") as writer:
        writer.add_scalar("train/loss", 1.0, 1)
    assert read_validation(tmp_path) is None
    with pytest.raises(SystemExit, match="no validation scalars"):
        plot(tmp_path)
    with SummaryWriter(tmp_path / "tb") as writer:
        writer.add_scalar("val/accuracy", 50.0, 2)
    read_events.cache_clear()  # a script reads a run once; this test rewrites it in between
    assert read_validation(tmp_path) == {"metric": "val/accuracy", "steps": [2], "values": [50.0],
                                         "train_seconds": [pytest.approx(float("nan"), nan_ok=True)]}


def test_a_run_continued_from_another_runs_checkpoint_is_drawn_whole(tmp_path):
    """A branch from the trunk's last.pt at meta-step 2, after which the trunk goes on to 4 and
    overwrites that file: the branch's curve is the trunk's validation at 2, then its own at 4 and
    6, and not the trunk's at 4 (logged after the branch point)."""
    sys.path.insert(0, str(REPO / "scripts"))
    from plot_runs import lineage, read_events, read_validation

    from imaml_cli.engine.checkpoint import load_checkpoint

    trunk, branch = tmp_path / "trunk", tmp_path / "branch"
    train(compose(QUICK + ["train.meta_steps=2"]), trunk)
    train(compose(QUICK + ["train.meta_steps=6", "outer_optimizer.lr=0.0005",
                           f"train.resume={trunk / 'checkpoints' / 'last.pt'}"]), branch)
    train(compose(QUICK), trunk)  # the trunk goes on to 4
    assert load_checkpoint(trunk / "checkpoints" / "last.pt")["step"] == 4

    def own(run):
        events = read_events(run).Scalars("val/mse")
        return {e.step: e.value for e in events}
    assert sorted(own(trunk)) == [2, 4] and sorted(own(branch)) == [4, 6]
    assert own(trunk)[4] != pytest.approx(own(branch)[4], rel=1e-4)
    assert [(f.name, after, until) for f, after, until in lineage(branch)] == \
        [("trunk", 0, 2), ("branch", 2, math.inf)]
    curve = read_validation(branch)
    assert curve["steps"] == [2, 4, 6]
    assert curve["values"] == [own(trunk)[2], own(branch)[4], own(branch)[6]]
    assert curve["train_seconds"][0] < curve["train_seconds"][1] < curve["train_seconds"][2]
    # The trunk alone is its own lineage.
    assert read_validation(trunk)["steps"] == [2, 4]
