"""imaml-train: compose the config with Hydra and meta-train in Hydra's run directory.

Under ``torchrun --nproc_per_node=N`` it trains one run data-parallel over the tasks. A refused
command ends as one line through the run directory's guard (``imaml_cli.run_dir_guard``), which
also undoes what Hydra wrote for it.
"""

from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from imaml_cli.command_line import checks_overrides
from imaml_cli.torchrun import torchrun_aware


@torchrun_aware
@checks_overrides("train")
@hydra.main(version_base="1.3", config_path="pkg://imaml_cli.conf", config_name="train")
def main(cfg: DictConfig) -> float:
    """Returns the best validation score, for sweepers that optimise it."""
    # Imported here so that --help and tab completion do not wait for torch.
    from imaml_cli.engine.loop import train

    return train(cfg, Path(HydraConfig.get().runtime.output_dir))


if __name__ == "__main__":
    main()
