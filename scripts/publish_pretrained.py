"""Publish a finished run as a row of the README's results: its best checkpoint as
pretrained/NAME.pt (parameters and config only) and the row in pretrained/results.json, with the
test accuracy measured by ``imaml-eval`` on that very file, so anyone gets the same number again.

    python scripts/publish_pretrained.py ~/imaml-runs/5w1s_imaml_gd --name omniglot_5w1s_imaml_gd
    python scripts/publish_pretrained.py RUN --name NAME --test-time "eval.inner_steps=32"   # and beside it
    python scripts/results_table.py        # then rewrite the README's table from results.json

Run it from the repository root, on the machine that trained the run (``hardware`` describes it;
``--hardware`` says otherwise).
"""

import argparse
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MAX_BYTES = 1 << 20


def fail(message: str):
    sys.exit(f"error: {message}")


def describe_hardware() -> str:
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    model = platform.processor() or "CPU"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                 if line.startswith("model name")]
        model = names[0] if names else model
    return f"{model}, {os.cpu_count()} cores, CPU only, torch {torch.__version__}"


def training_command(run_dir: Path) -> str:
    overrides = run_dir / ".hydra" / "overrides.yaml"
    if not overrides.is_file():
        fail(f"{overrides} is missing; pass the training command with --command")
    from omegaconf import OmegaConf

    # Without the run folder it had on the machine that trained it: a user pastes it anywhere.
    return " ".join(["imaml-train", *(o for o in OmegaConf.load(overrides) if not o.startswith("hydra.run.dir="))])


def evaluate(checkpoint: Path, overrides: str = "") -> dict:
    """``imaml-eval`` on the published file, as a user would run it (with ``overrides``); its eval.json."""
    with tempfile.TemporaryDirectory() as folder:
        command = [sys.executable, "-m", "imaml_cli.evaluate", f"checkpoint={checkpoint}", *shlex.split(overrides),
                   f"hydra.run.dir={folder}", "hydra.output_subdir=null"]
        done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
        if done.returncode != 0:
            fail(f"imaml-eval failed on {checkpoint}: {done.stderr.strip().splitlines()[-1:]}")
        return json.loads((Path(folder) / "eval.json").read_text())


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a finished run directory (results.json, checkpoints/)")
    parser.add_argument("--name", required=True, help="file name in pretrained/, without .pt")
    parser.add_argument("--command", help="the training command, where the run has no .hydra/overrides.yaml")
    parser.add_argument("--hardware", help="the machine that trained it (default: this one)")
    parser.add_argument("--test-time", action="append", default=[], metavar="OVERRIDES",
                        help="also test the published file with these imaml-eval overrides (e.g. "
                             "'eval.inner_steps=32'); the table shows it beside the row's number; repeatable")
    parser.add_argument("--out", type=Path, default=REPO / "pretrained")
    args = parser.parse_args(argv)

    sys.path.insert(0, str(REPO))
    sys.path.insert(0, str(REPO / "scripts"))
    from omegaconf import OmegaConf
    from plot_runs import read_validation

    from imaml_cli.engine.checkpoint import load_checkpoint, save_checkpoint

    run = args.run.resolve()
    if not (run / "results.json").is_file():
        fail(f"{run} has no results.json: the run has not finished; rerun its command to continue it")
    finished = json.loads((run / "results.json").read_text())
    # Kept in the row, so the published curves plot after the run folder is gone (plot_runs.py
    # --results); a run that never validated has none.
    curve = read_validation(run) if (run / "tb").is_dir() else None
    source = run / "checkpoints" / ("best.pt" if (run / "checkpoints" / "best.pt").is_file() else "last.pt")
    state = load_checkpoint(source)
    config = OmegaConf.to_container(OmegaConf.create(state["config"]))

    target = args.out / f"{args.name}.pt"
    save_checkpoint({"step": state["step"], "params": state["params"], "config": state["config"]}, target)
    size = target.stat().st_size
    if size > MAX_BYTES:
        target.unlink()
        fail(f"{target} would be {size} bytes, over the 1 MiB limit for pretrained/")
    # Rows name their file relative to the repository, where pretrained/ lives.
    relative = target.resolve()
    if relative.is_relative_to(REPO):
        relative = relative.relative_to(REPO)
    result = evaluate(relative)

    row = {
        "dataset": config["dataset"]["name"], "ways": config["dataset"]["ways"], "shots": config["dataset"]["shots"],
        "algorithm": config["algorithm"]["name"], "inner_solver": config["inner_solver"]["name"],
        "meta_steps": finished["meta_steps"], "meta_batch_size": config["train"]["meta_batch_size"],
        "checkpoint_step": state["step"], "queries": result["queries"], "episodes": result["episodes"],
        "test_accuracy": round(result["mean"], 2), "ci95": round(result["ci95"], 2),
        "checkpoint": str(relative), "command": args.command or training_command(args.run),
        "hardware": args.hardware or describe_hardware(), "wall_clock_s": round(finished["wall_clock_s"]),
    }
    if args.test_time:
        row["test_time"] = []
        for overrides in args.test_time:
            other = evaluate(relative, overrides)
            row["test_time"].append({"overrides": overrides, "test_accuracy": round(other["mean"], 2),
                                     "ci95": round(other["ci95"], 2), "episodes": other["episodes"]})
    if curve:
        # Strict JSON has no NaN: seconds the run did not log are null.
        row["validation"] = {**curve, "values": [round(v, 4) for v in curve["values"]],
                             "train_seconds": [None if math.isnan(t) else round(t, 1) for t in curve["train_seconds"]]}
    table = args.out / "results.json"
    rows = json.loads(table.read_text()) if table.is_file() else []
    rows = [r for r in rows if r["checkpoint"] != row["checkpoint"]] + [row]
    rows.sort(key=lambda r: (r["dataset"], r["ways"], r["shots"], r["algorithm"], r["inner_solver"]))
    tmp = table.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(rows, indent=2, allow_nan=False) + "\n")
    tmp.replace(table)
    print(f"{relative}: {row['test_accuracy']:.2f}% ± {row['ci95']:.2f} on {row['episodes']} test episodes, "
          f"{row['queries']} quer{'y' if row['queries'] == 1 else 'ies'} per class; row written to {table}")


if __name__ == "__main__":
    main()
