"""A Hydra callback that ends a ``-m`` sweep with each job's score and the best job's folder.

It reads the jobs' ``results.json`` files from the sweep directory rather than the launcher's
return values, so it works alike for jobs run in this process, by joblib or on SLURM. The summary
is printed and written to ``<sweep dir>/summary.json``.
"""

import json
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf


def _job(folder: Path) -> dict:
    results = json.loads((folder / "results.json").read_text())
    overrides = folder / ".hydra" / "overrides.yaml"
    return {"folder": str(folder), "overrides": list(OmegaConf.load(overrides)) if overrides.is_file() else [],
            "metric": results["test"]["metric"], "score": results["score"],
            "validated": results["best_val"] is not None, "test": results["test"]["mean"]}


def summarize(sweep_dir: Path) -> dict | None:
    """The jobs under ``sweep_dir`` that finished, and the best of them by their score."""
    jobs = [_job(p.parent) for p in sorted(sweep_dir.glob("*/results.json"), key=lambda p: (len(p.parent.name),
                                                                                             p.parent.name))]
    if not jobs:
        return None
    comparable = {(job["metric"], job["validated"]) for job in jobs} == {(jobs[0]["metric"], jobs[0]["validated"])}
    best = None
    if comparable:
        # The score is the best validation accuracy (higher is better) or MSE (lower is better).
        pick = max if jobs[0]["metric"] == "accuracy" else min
        best = pick(jobs, key=lambda job: job["score"])
    return {"jobs": jobs, "best": best}


def lines(summary: dict) -> list[str]:
    def value(job: dict, key: str) -> str:
        return f"{job[key]:.2f}%" if job["metric"] == "accuracy" else f"{job[key]:.4f}"

    # The overrides every job shares say nothing about how the jobs differ.
    shared = set.intersection(*(set(job["overrides"]) for job in summary["jobs"]))
    out = []
    for job in summary["jobs"]:
        own = " ".join(o for o in job["overrides"] if o not in shared) or "(the only job)"
        kind, metric = ("val" if job["validated"] else "test"), "MSE" if job["metric"] == "mse" else job["metric"]
        out.append(f"{Path(job['folder']).name}: {own}: {kind} {metric} {value(job, 'score')} "
                   f"(test {value(job, 'test')})")
    best = summary["best"]
    out.append(f"best: {best['folder']}" if best else "best: none (the jobs' scores are not comparable)")
    return out


class SweepSummary(Callback):
    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir)).absolute()
        summary = summarize(sweep_dir)
        if summary is None:
            return
        print("\n".join(["sweep summary:", *lines(summary)]), flush=True)
        (sweep_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
