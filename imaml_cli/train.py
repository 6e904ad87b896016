"""imaml-train: compose the config with Hydra and meta-train in Hydra's run directory.

Under ``torchrun --nproc_per_node=N`` it trains one run data-parallel over the tasks.
"""

from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from imaml_cli.errors import exit_on_user_error
from imaml_cli.torchrun import torchrun_aware


@torchrun_aware
@hydra.main(version_base="1.3", config_path="pkg://imaml_cli.conf", config_name="train")
def main(cfg: DictConfig) -> float:
    """Returns the best validation score, for sweepers that optimise it."""
    with exit_on_user_error():
        # Imported here so that --help and tab completion do not wait for torch.
        from imaml_cli.engine.loop import train

        return train(cfg, Path(HydraConfig.get().runtime.output_dir))


if __name__ == "__main__":
    main()
