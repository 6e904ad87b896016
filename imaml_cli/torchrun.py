"""Hydra under torchrun: every rank composes the same config, rank 0 alone owns the run directory.

torchrun starts the command once per rank. Hydra would make each rank its own run directory (the
default one is named after the time, which differs between ranks that start a second apart) and
write ``.hydra/`` and a log file into it. The ranks above 0 therefore run Hydra in the current
folder with no output subfolder and no logging, and the training loop tells them rank 0's
directory (``Distributed.shared_folder``). No torch here: ``--help`` stays fast.
"""

import functools
import os
import sys
from collections.abc import Mapping

from imaml_cli.errors import UserError, exit_on_user_error

# Hydra writes nothing with these; mkdir(".") is a no-op.
QUIET_RANK = ("hydra.run.dir=.", "hydra.output_subdir=null", "hydra/job_logging=disabled",
              "hydra/hydra_logging=disabled")


def is_quiet_rank(environ: Mapping[str, str]) -> bool:
    """A rank above 0 of torchrun: it owns no run directory."""
    return int(environ.get("WORLD_SIZE", "1")) > 1 and int(environ.get("RANK", "0")) != 0


def rank_argv(argv: list[str], environ: Mapping[str, str]) -> list[str]:
    """The command line this rank's Hydra should see."""
    if int(environ.get("WORLD_SIZE", "1")) == 1:
        return argv
    if "-m" in argv or "--multirun" in argv:
        raise UserError("-m (sweeps) cannot run under torchrun, which trains one run on several GPUs; "
                        "sweep with imaml-train -m hydra/launcher=submitit_slurm (docs/scaling-out.md, SLURM)")
    return [*argv, *QUIET_RANK] if is_quiet_rank(environ) else argv


def torchrun_aware(hydra_main):
    """Wrap a ``@hydra.main`` function so that it can run on every rank of torchrun."""

    @functools.wraps(hydra_main)
    def main():
        with exit_on_user_error():
            sys.argv = rank_argv(sys.argv, os.environ)
        return hydra_main()

    return main
