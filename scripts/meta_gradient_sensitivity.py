"""How much the meta-gradient of one meta-batch moves when θ moves by a relative ``--epsilon``.

    python scripts/meta_gradient_sensitivity.py experiment=omniglot_5w1s dataset.root=data/omniglot
    python scripts/meta_gradient_sensitivity.py --checkpoint RUN/checkpoints/best.pt dataset.root=data/omniglot

Each trial multiplies every entry of θ by (1 + ε ξ), ξ standard normal, and prints
‖g(θ') − g(θ)‖ / ‖g(θ)‖ over all parameters. For a smooth meta-gradient this is about ε times
a modest condition number; rounding (ε ≈ 1e-7 in float32) is what two torchrun ranks and one
process differ by, so a large ratio at that ε means their runs part after a few meta-steps,
whatever the code path (docs/scaling-out.md).
"""

import argparse
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from imaml_cli.config import validate  # noqa: E402
from imaml_cli.engine import components  # noqa: E402
from imaml_cli.engine.checkpoint import load_checkpoint, load_params  # noqa: E402
from imaml_cli.engine.evaluation_run import apply_overrides  # noqa: E402


def relative_change(learner, theta: dict, tasks, epsilon: float, generator: torch.Generator) -> float:
    reference, _ = learner.meta_gradient(theta, tasks)
    moved = {k: v * (1 + epsilon * torch.randn(v.shape, generator=generator)) for k, v in theta.items()}
    gradient, _ = learner.meta_gradient(moved, tasks)
    change = sum(((gradient[k] - reference[k]).double() ** 2).sum() for k in theta).sqrt()
    return (change / sum((reference[k].double() ** 2).sum() for k in theta).sqrt()).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("overrides", nargs="*", help="imaml-train overrides (with --checkpoint: changes to its config)")
    parser.add_argument("--checkpoint", help="θ and config from this checkpoint instead of the config's initialisation")
    parser.add_argument("--epsilon", type=float, default=1e-7)
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--tasks", type=int, default=None, help="tasks in the meta-batch (default: the config's)")
    parser.add_argument("--seed", type=int, default=0, help="draws the meta-batch and the perturbations")
    args = parser.parse_args()

    from hydra import compose, initialize_config_module

    with initialize_config_module("imaml_cli.conf", version_base="1.3"):
        composed = compose("train", overrides=[] if args.checkpoint else args.overrides)
        if args.checkpoint:
            state = load_checkpoint(Path(args.checkpoint))
            composed = apply_overrides(OmegaConf.create(state["config"]), compose("train", overrides=args.overrides),
                                       args.overrides)
    config = validate(composed)
    device = components.resolve_device(config["device"])
    network = components.build_network(config, device)
    if args.checkpoint:
        load_params(network, state, args.checkpoint)
    learner = components.build_learner(config, network, device)
    theta = {k: v.detach() for k, v in network.named_parameters()}
    generator = torch.Generator().manual_seed(args.seed)
    tasks = components.build_source(config, "train", device).sample(
        args.tasks or config["train"]["meta_batch_size"], generator)
    changes = [relative_change(learner, theta, tasks, args.epsilon, generator) for _ in range(args.trials)]
    print(f"epsilon {args.epsilon:g}: relative change of the meta-gradient "
          + " ".join(f"{c:.2e}" for c in changes) + f" (median {sorted(changes)[len(changes) // 2]:.2e})")


if __name__ == "__main__":
    main()
