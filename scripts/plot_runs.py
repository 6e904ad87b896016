"""Validation accuracy against meta-step and against training time, for one or more runs.

    python scripts/plot_runs.py outputs/imaml outputs/maml --labels iMAML MAML --out docs/runs.png
    python scripts/plot_runs.py --results pretrained/results.json --out published_runs.png

Reads each run directory's TensorBoard events (``val/accuracy`` or ``val/mse`` and
``val/train_seconds``: meta-training time without validation) and draws two panels into a PNG.
A run continued in a new folder from another run's checkpoint (``train.resume=``) is drawn whole:
the earlier folder's meta-steps up to the checkpoint, then its own.
``--results`` adds the validation curve each published row keeps (``scripts/publish_pretrained.py``
stores it; rows published before it did have none), so published runs plot without their run
folders. ``--measures`` adds a panel per named scalar against meta-step, for the measurements of
iMAML's assumptions over a run (README: "Is the inner problem solved?"); put the run directories
first, since ``--measures`` takes every word after it:

    python scripts/plot_runs.py ~/imaml-runs/5w1s_imaml_gd_20k --measures train/inner_grad_norm \
        train/inner_halvings --out flagship.png

Needs matplotlib (``pip install -e ".[plot]"``).
"""

import argparse
import functools
import math
import sys
from pathlib import Path


@functools.lru_cache(maxsize=None)
def read_events(run_dir: Path):
    """The run's TensorBoard scalars, read once however many curves and measures a plot takes."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0})
    events.Reload()
    return events


@functools.lru_cache(maxsize=None)
def lineage(run_dir: Path) -> tuple[tuple[Path, int, float], ...]:
    """The run folders a run's meta-steps come from, oldest first, each with the meta-steps it
    contributes (after, up to]: a run continued in a new folder with ``train.resume=`` from a full
    checkpoint of another run folder holds that run's meta-steps up to the checkpoint's, and so on
    back. A run started afresh, or from a file outside a run folder, is its own lineage."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from omegaconf import OmegaConf

    from imaml_cli.engine.checkpoint import load_checkpoint
    from imaml_cli.errors import UserError

    def branch_point(folder: Path) -> tuple[Path, int] | None:
        try:
            state = load_checkpoint(folder / "checkpoints" / "last.pt")
            if state.get("branched_from"):
                path, step = Path(state["branched_from"]["path"]), state["branched_from"]["step"]
            else:
                # Checkpoints written before runs recorded their branch point: the resume file's
                # step, right as long as that file has not been overwritten since.
                resume = OmegaConf.create(state["config"]).train.resume
                resumed = load_checkpoint(Path(resume)) if resume and Path(resume).is_file() else {}
                if "optimizer" not in resumed:  # none, or parameters only (pretrained/): a new run
                    return None
                path, step = Path(resume), resumed["step"]
        except (UserError, FileNotFoundError):
            return None
        return (path.parent.parent, step) if (path.parent.parent / "tb").is_dir() else None

    chain, folder, until, seen = [], run_dir, math.inf, {run_dir.resolve()}
    # A folder met again (a run resumed from its own best.pt after a damaged last.pt) ends the walk.
    while (point := branch_point(folder)) and point[0].resolve() not in seen:
        chain.append((folder, point[1], until))
        folder, until = point
        seen.add(folder.resolve())
    chain.append((folder, 0, until))
    return tuple(chain[::-1])


def _scalars(run_dir: Path, tag: str) -> list:
    """``tag``'s events over the run's lineage, each meta-step from the folder that holds it."""
    out = []
    for folder, after, until in lineage(run_dir):
        events = read_events(folder)
        if tag in events.Tags()["scalars"]:
            out += [e for e in events.Scalars(tag) if after < e.step <= until]
    return out


def read_validation(run_dir: Path) -> dict | None:
    """The run's validations over its lineage: ``metric``, and per validation ``steps``, ``values``
    and ``train_seconds`` (meta-training time before it; NaN where the run did not log it); None
    where the run has no validation scalars."""
    tags = read_events(run_dir).Tags()["scalars"]
    metric = next((t for t in ("val/accuracy", "val/mse") if t in tags), None)
    if metric is None:
        return None
    values = _scalars(run_dir, metric)
    seconds = {e.step: e.value for e in _scalars(run_dir, "val/train_seconds")}
    return {"metric": metric, "steps": [e.step for e in values], "values": [e.value for e in values],
            "train_seconds": [seconds.get(e.step, float("nan")) for e in values]}


def load_curve(run_dir: Path) -> dict:
    if not (run_dir / "tb").is_dir():
        sys.exit(f"error: {run_dir} has no tb/ folder; pass the run directories that imaml-train wrote")
    curve = read_validation(run_dir)
    if curve is None:
        sys.exit(f"error: {run_dir}/tb has no validation scalars; was train.val_every 0?")
    return curve


def published_curves(results: Path) -> list[tuple[str, dict]]:
    """(label, curve) for each row of a results.json that keeps its validation curve."""
    import json

    def name(row: dict) -> str:
        algorithm = f"iMAML-{row['inner_solver'].upper()}" if row["algorithm"] == "imaml" else row["algorithm"]
        return f"{row['dataset']} {row['ways']}-way {row['shots']}-shot {algorithm}"

    rows = json.loads(results.read_text())
    # Seconds a run did not log are stored as null.
    return [(name(r), {**r["validation"], "train_seconds": [float("nan") if t is None else t
                                                           for t in r["validation"]["train_seconds"]]})
            for r in rows if r.get("validation")]


def load_measure(run_dir: Path, tag: str) -> tuple[list[int], list[float]]:
    events = read_events(run_dir)
    if tag not in events.Tags()["scalars"]:
        sys.exit(f"error: {run_dir}/tb has no scalar '{tag}'; it has "
                 f"{', '.join(sorted(t for t in events.Tags()['scalars'] if t.startswith('train/')))}")
    values = _scalars(run_dir, tag)
    return [e.step for e in values], [e.value for e in values]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="*", type=Path, help="run directories (each with a tb/ folder)")
    parser.add_argument("--results", type=Path, help="a results.json: also each row's stored validation curve")
    parser.add_argument("--labels", nargs="+", help="one legend label per run (default: folder names)")
    parser.add_argument("--out", type=Path, default=Path("runs.png"))
    parser.add_argument("--title", default="")
    parser.add_argument("--measures", nargs="+", default=[], metavar="TAG",
                        help="scalars to draw against meta-step below the curves, one panel each "
                             "(for example train/inner_grad_norm)")
    args = parser.parse_args(argv)
    labels = args.labels or [r.name for r in args.runs]
    if len(labels) != len(args.runs):
        sys.exit(f"error: {len(labels)} labels for {len(args.runs)} runs; give one label per run")
    curves = [(label, load_curve(run), run) for run, label in zip(args.runs, labels)]
    if args.results:
        if not args.results.is_file():
            sys.exit(f"error: {args.results} does not exist; pass pretrained/results.json")
        curves += [(label, curve, None) for label, curve in published_curves(args.results)]
    if not curves:
        sys.exit("error: nothing to plot; pass run directories (before --measures, which takes every word "
                 "after it) or --results with rows that keep a curve")
    if args.measures and not args.runs:
        sys.exit("error: --measures needs run directories: published rows keep only their validation curve")
    metrics = {curve["metric"] for _, curve, _ in curves}
    if len(metrics) > 1:
        sys.exit(f"error: the runs validate on different metrics ({', '.join(sorted(metrics))}); plot them apart")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        sys.exit('error: matplotlib is not installed; pip install -e ".[plot]"')

    fig = plt.figure(figsize=(11, 4 + 2.5 * len(args.measures)), constrained_layout=True)
    grid = fig.add_gridspec(1 + len(args.measures), 2, height_ratios=[4] + [2.5] * len(args.measures))
    by_step, by_time = fig.add_subplot(grid[0, 0]), fig.add_subplot(grid[0, 1])
    measures = [fig.add_subplot(grid[1 + row, :]) for row in range(len(args.measures))]
    for label, curve, run in curves:
        by_step.plot(curve["steps"], curve["values"], marker="o", markersize=3, label=label)
        by_time.plot([s / 60 for s in curve["train_seconds"]], curve["values"], marker="o", markersize=3, label=label)
        # A published row keeps its validation curve only, so it has no measurement panels.
        for ax, tag in zip(measures, args.measures if run is not None else []):
            ax.plot(*load_measure(run, tag), linewidth=0.8, label=label)
    for ax, tag in zip(measures, args.measures):
        ax.set_xlabel("meta-step")
        ax.set_ylabel(tag)
        ax.grid(alpha=0.3)
        ax.legend()
    accuracy = metrics.pop().endswith("accuracy")
    ylabel = "validation accuracy (%)" if accuracy else "validation MSE"
    for ax, xlabel in ((by_step, "meta-step"), (by_time, "meta-training time (minutes)")):
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        # Curves rise (accuracy) or fall (MSE) early, leaving the opposite corner free late in the run.
        ax.legend(loc="lower right" if accuracy else "upper right")
    if args.title:
        fig.suptitle(args.title)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
