import runpy
import sys
from pathlib import Path

import pytest

from conftest import QUICK, REPO, compose
from imaml_cli.engine.loop import train

pytest.importorskip("matplotlib")


def plot(*args):
    argv = sys.argv
    sys.argv = ["plot_runs.py", *map(str, args)]
    try:
        runpy.run_path(str(REPO / "scripts" / "plot_runs.py"), run_name="__main__")
    finally:
        sys.argv = argv


def test_plots_validation_curves_of_two_runs(tmp_path):
    for name, lam in (("a", 0.5), ("b", 2.0)):
        train(compose(QUICK + [f"algorithm.lam={lam}"]), tmp_path / name)
    out = tmp_path / "plot.png"
    plot(tmp_path / "a", tmp_path / "b", "--labels", "lam 0.5", "lam 2", "--out", out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000


def test_a_folder_that_is_not_a_run_is_named(tmp_path):
    with pytest.raises(SystemExit, match=f"{tmp_path} has no tb/ folder"):
        plot(tmp_path)
