"""Hydra callbacks that tests add to a command line (``+hydra.callbacks.NAME._target_=...``)."""

import json
from pathlib import Path

from hydra.experimental.callback import Callback


class RecordReturnValue(Callback):
    """Appends each job's number and return value (what a sweeper optimises) to a JSON-lines file."""

    def __init__(self, path: str):
        self.path = Path(path)

    def on_job_end(self, config, job_return, **kwargs) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps({"job": config.hydra.job.num, "value": job_return.return_value}) + "\n")
