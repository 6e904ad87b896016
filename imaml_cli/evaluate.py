"""imaml-eval checkpoint=PATH: evaluate a checkpoint with its stored config and any overrides.

PATH is a checkpoint file or a run directory (its best checkpoint, else its last). Under
``torchrun --nproc_per_node=N`` the episodes are split across the processes.
"""

from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from imaml_cli.command_line import checks_overrides
from imaml_cli.torchrun import torchrun_aware


@torchrun_aware
@checks_overrides("eval", extra_keys=("checkpoint",))
@hydra.main(version_base="1.3", config_path="pkg://imaml_cli.conf", config_name="eval")
def main(cfg: DictConfig) -> float:
    from imaml_cli.engine.evaluation_run import evaluate_checkpoint

    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    # Hydra recorded the composed defaults there; the checkpoint's own config is what runs.
    record = run_dir / hydra_cfg.output_subdir / "config.yaml" if hydra_cfg.output_subdir else None
    return evaluate_checkpoint(cfg, list(hydra_cfg.overrides.task), run_dir, config_record=record)


if __name__ == "__main__":
    main()
