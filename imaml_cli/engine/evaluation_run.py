"""imaml-eval's work: the stored config of a checkpoint, the user's overrides on top, one evaluation."""

import logging
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from imaml_cli.config import SCHEMA, unknown_key, validate
from imaml_cli.engine import components
from imaml_cli.engine.checkpoint import load_checkpoint, load_params
from imaml_cli.engine.distributed import Distributed
from imaml_cli.engine.evaluation import evaluate
from imaml_cli.engine.logging import report, write_json
from imaml_cli.errors import UserError

log = logging.getLogger("imaml")

GROUPS = ("dataset", "model", "algorithm", "inner_solver", "cg", "outer_optimizer")
# Settings whose absence from an older checkpoint changes nothing here: meta-training's alone
# (evaluation adapts on the support set for every algorithm), speed only, or settings whose default
# does what the code did before they existed. Not worth a warning.
NO_EFFECT_ON_EVALUATION = ("train.", "outer_optimizer.", "algorithm.alternate_query", "algorithm.zero_head",
                           "perf.task_groups", "inner_solver.tol", "inner_solver.curvature", "inner_solver.lm_damping",
                           "cg.trust_radius")


def apply_overrides(stored: DictConfig, composed: DictConfig, overrides: list[str]) -> DictConfig:
    """Copy into the stored config each value the command line set (Hydra has already parsed and
    type-converted them in ``composed``); a group choice such as inner_solver=hf copies the group."""
    merged = stored.copy()
    # A checkpoint written before a setting existed runs with today's default for it (and the
    # command line may set it like any other key).
    newer = [key for key in SCHEMA if OmegaConf.select(stored, key, default="<absent>") == "<absent>"]
    for key in newer:
        OmegaConf.update(merged, key, OmegaConf.select(composed, key), merge=False)
    relevant = [key for key in newer if not key.startswith(NO_EFFECT_ON_EVALUATION)]
    if relevant:
        log.warning("the checkpoint predates %s; using today's defaults: %s", ", ".join(relevant),
                    ", ".join(f"{k}={OmegaConf.select(composed, k)}" for k in relevant))
    for override in overrides:
        key = override.split("=", 1)[0].lstrip("+~")
        if key == "checkpoint" or key.startswith("hydra"):
            continue
        if key == "experiment":
            raise UserError("experiment=... cannot change at evaluation; override single keys instead "
                            "(e.g. inner_solver.steps=20 eval.episodes=1000)")
        if key not in GROUPS and OmegaConf.select(merged, key, default="<absent>") == "<absent>":
            raise unknown_key(key, SCHEMA)
        OmegaConf.update(merged, key, OmegaConf.select(composed, key), merge=False)
    # The stored inner_solver.steps is a number, resolved at training from the preset's
    # inner_steps: another solver or step count per solver on the command line reaches it the same way.
    keys = {override.split("=", 1)[0].lstrip("+~") for override in overrides}
    if "inner_solver.steps" not in keys and any(k == "inner_solver" or k.startswith("inner_steps") for k in keys):
        steps = OmegaConf.select(merged, f"inner_steps.{merged.inner_solver.name}")
        if steps is not None:
            merged.inner_solver.steps = steps
    return merged


def checkpoint_file(path: Path) -> Path:
    """``path`` itself, or for a run directory its best checkpoint, else its last."""
    if not path.is_dir():
        return path
    for folder in (path / "checkpoints", path):
        for name, what in (("best.pt", "the best validation checkpoint"), ("last.pt", "the last checkpoint")):
            if (folder / name).is_file():
                log.info("evaluating %s, %s of %s", folder / name, what, path)
                return folder / name
    raise UserError(f"{path} is a folder without checkpoints/best.pt or checkpoints/last.pt; pass an imaml-train "
                    "run directory or a checkpoint file")


def evaluate_checkpoint(cfg: DictConfig, overrides: list[str], run_dir: Path, config_record: Path | None = None
                        ) -> float:
    """Print the one-line result and write ``eval.json`` into ``run_dir``; returns the mean.

    ``config_record`` receives the config the evaluation ran with. Under torchrun the episodes are
    split across the ranks and rank 0 reports them all.
    """
    if OmegaConf.is_missing(cfg, "checkpoint"):
        raise UserError("no checkpoint given; run imaml-eval checkpoint=PATH/checkpoints/best.pt (or checkpoint=RUN_DIR)")
    path = checkpoint_file(Path(cfg.checkpoint))
    state = load_checkpoint(path)
    config = validate(apply_overrides(OmegaConf.create(state["config"]), cfg, overrides))
    world = Distributed.start(components.resolve_device(config["device"]))
    try:
        network = components.build_network(config, world.device)
        load_params(network, state, path)
        learner = components.build_learner(components.evaluation_config(config), network, world.device)
        ecfg = config["eval"]
        if world.is_main:
            print(f"run folder: {run_dir}", flush=True)
        source = world.main_first(lambda: components.build_source(config, ecfg["split"], world.device, evaluation=True))
        result = evaluate(learner, dict(network.named_parameters()), source, episodes=ecfg["episodes"],
                          seed=ecfg["seed"], batch_size=ecfg["batch_size"], split=ecfg["split"],
                          shard=(world.rank, world.world), gather=world.gather_lists,
                          progress=world.is_main and config["train"]["progress"])
        if world.is_main:
            report(result.line(), f"{result.line()} (checkpoint: {path.resolve()})")
            run_dir.mkdir(parents=True, exist_ok=True)
            write_json(run_dir / "eval.json", {**result.to_dict(), "checkpoint": str(path.resolve()),
                                               "meta_step": state["step"], "overrides": overrides})
            print(f"written: {run_dir / 'eval.json'}", flush=True)
            if config_record is not None:
                used = OmegaConf.create({**config, "checkpoint": str(path.resolve())})
                config_record.write_text(OmegaConf.to_yaml(used))
        # No rank tears the process group down while another still uses it (gloo aborted a rank
        # that way once, under load).
        world.barrier()
        return result.mean
    finally:
        world.close()
