"""imaml-eval checkpoint=PATH: evaluate a checkpoint with its stored config and any overrides.

Under ``torchrun --nproc_per_node=N`` the episodes are split across the processes.
"""

from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from imaml_cli.errors import exit_on_user_error
from imaml_cli.torchrun import torchrun_aware


@torchrun_aware
@hydra.main(version_base="1.3", config_path="pkg://imaml_cli.conf", config_name="eval")
def main(cfg: DictConfig) -> float:
    with exit_on_user_error():
        from imaml_cli.engine.evaluation_run import evaluate_checkpoint

        return evaluate_checkpoint(cfg, list(HydraConfig.get().overrides.task),
                                   Path(HydraConfig.get().runtime.output_dir))


if __name__ == "__main__":
    main()
