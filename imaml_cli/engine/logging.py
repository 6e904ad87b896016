"""Run outputs a person reads: TensorBoard scalars and hparams, the result line, results.json."""

import json
import logging
import os
import tempfile
from pathlib import Path

import torch

from imaml_cli.engine.file_mode import as_if_created

log = logging.getLogger("imaml")


class TensorBoard:
    """Scalars under ``run_dir/tb``; on resume, events after the resumed step are discarded.

    The checkpoint of meta-step s is written after everything logged at s, so what a killed run
    logged up to s stays and what it logged after s (which the resumed run repeats) goes.
    Accuracies are in percent, in training as in validation.
    """

    def __init__(self, run_dir: Path, resumed_step: int):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(run_dir / "tb"), purge_step=resumed_step + 1 if resumed_step else None)

    def scalars(self, prefix: str, values: dict[str, float], step: int) -> None:
        for key, value in values.items():
            self.writer.add_scalar(f"{prefix}/{key}", value, step)

    def training_scalars(self, values: dict[str, float], step: int) -> None:
        """A meta-step's metrics; their accuracies (fractions of a task's queries) in percent."""
        self.scalars("train", {k: 100 * v if k.endswith("_accuracy") else v for k, v in values.items()}, step)

    def hparams(self, hparams: dict, metrics: dict[str, float]) -> None:
        """The hparams record, written into this run's own folder (add_hparams would make a subfolder)."""
        from torch.utils.tensorboard.summary import hparams as summary

        experiment, start, end = summary(hparams, metrics)
        for record in (experiment, start, end):
            self.writer.file_writer.add_summary(record)
        for key, value in metrics.items():
            self.writer.add_scalar(key, value)

    def close(self) -> None:
        self.writer.close()


def flat_hparams(config: dict, prefix: str = "") -> dict:
    """TensorBoard accepts only scalars and strings as hparams."""
    out = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(flat_hparams(value, f"{prefix}{key}."))
        elif isinstance(value, (int, float, str, bool)):
            out[f"{prefix}{key}"] = value
        elif value is not None:
            out[f"{prefix}{key}"] = str(value)
    return out


def report(line: str, logged: str | None = None) -> None:
    """Print a result line once, plain, and put it (or ``logged``) into the run's log file only:
    through Hydra's console handler it would appear a second time, as a log record."""
    print(line, flush=True)
    record = log.makeRecord(log.name, logging.INFO, __file__, 0, logged or line, None, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def mean_metrics(metrics: dict[str, torch.Tensor]) -> dict[str, float]:
    return {k: v.float().mean().item() for k, v in metrics.items()}


def write_json(path: Path, payload: dict) -> None:
    """Atomically, like checkpoints: a reader never sees half a file."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        as_if_created(fd)
        with os.fdopen(fd, "w") as f:
            json.dump(payload, f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
