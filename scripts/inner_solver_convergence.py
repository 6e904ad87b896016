"""How well each inner solver solves iMAML's inner problem at a checkpoint's θ: the proximal
objective L̂(φ) + λ/2‖φ − θ‖², its gradient norm at φ (0 at the exact minimiser the implicit gradient
assumes), the post-adaptation query accuracy, and the time, for GD and for Newton-CG (HF) at
several step counts, on the same meta-batch of training tasks. Then what the meta-gradient sees at
each φ: the largest Hessian eigenvalue of the support loss (by magnitude, by power iteration per
task), the outer CG's relative residual, and the cosine between each solver's meta-gradient and
the first solver's.

    python scripts/inner_solver_convergence.py ~/imaml-runs/5w1s_imaml_gd/checkpoints/last.pt \
        --root ../shared/data/omniglot --gd 16 --hf 1 2 3 5 8

HF takes the config's curvature and Levenberg-Marquardt damping (``--set
inner_solver.curvature=gauss_newton inner_solver.lm_damping=1``); ``--hf-cg 5 10 20`` tries
several CG step counts per Newton direction.

It chose the presets' `inner_steps.hf` (docs/results.md). ``--init`` takes θ at the
initialisation the checkpoint's config draws (its ``train.seed``) instead of the checkpoint's
parameters: where the iMAML-HF run went astray (docs/results.md).
"""

import argparse
import dataclasses
import time
from pathlib import Path


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--root", help="dataset.root, where the checkpoint's differs")
    parser.add_argument("--tasks", type=int, default=32)
    parser.add_argument("--gd", type=int, nargs="+", default=[16], help="GD step counts")
    parser.add_argument("--hf", type=int, nargs="*", default=[1, 2, 3, 5, 8], help="Newton iteration counts")
    parser.add_argument("--hf-cg", type=int, nargs="+", help="CG steps per Newton direction (each with each "
                        "--hf count); default: the config's inner_solver.cg_steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--init", action="store_true", help="θ at initialisation, not the checkpoint's")
    parser.add_argument("--power-iterations", type=int, default=30, help="for the top Hessian eigenvalue")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="overrides of the checkpoint's config, as imaml-eval takes them (with --init, "
                             "e.g. model.activation=softplus perf.fused=false: another network from the same seed)")
    args = parser.parse_args(argv)

    import torch
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf
    from torch.func import grad_and_value, vmap

    from imaml_cli.config import validate
    from imaml_cli.engine import components
    from imaml_cli.engine.checkpoint import load_checkpoint, load_params
    from imaml_cli.engine.evaluation_run import apply_overrides
    from imaml_cli.meta import tree
    from imaml_cli.meta.hvp import hessian_operator
    from imaml_cli.meta.inner import GradientDescent, NewtonCG, proximal

    state = load_checkpoint(args.checkpoint)
    with initialize_config_module("imaml_cli.conf", version_base="1.3"):
        defaults = compose("train", overrides=args.set)
    # As imaml-eval does: settings newer than the checkpoint take today's defaults.
    stored = apply_overrides(OmegaConf.create(state["config"]), defaults, args.set)
    if args.root:
        stored.dataset.root = args.root
    config = validate(stored)
    device = torch.device("cpu")
    network = components.build_network(config, device)
    if not args.init:
        load_params(network, state, args.checkpoint)
    learner = components.build_learner(config, network, device)
    theta = {k: v.detach() for k, v in network.named_parameters()}
    source = components.build_source(config, "train", device)
    tasks = source.sample(args.tasks, torch.Generator().manual_seed(args.seed))
    lam = config["algorithm"]["lam"]
    model = learner.model

    def objective_and_gradient_norm(phi):
        def one(phi_task, xs, ys):
            g, value = grad_and_value(proximal(lambda p: model.loss(p, xs, ys), theta, lam))(phi_task)
            return value, torch.sqrt(tree.dot(g, g))

        return vmap(one)(phi, tasks.support_x, tasks.support_y)

    def top_eigenvalue(phi):
        def one(phi_task, xs, ys):
            hessian = hessian_operator(lambda p: model.loss(p, xs, ys), phi_task, "forward_over_reverse")
            v = {k: torch.ones_like(x) for k, x in phi_task.items()}
            for _ in range(args.power_iterations):
                v = tree.scale(v, 1.0 / torch.sqrt(tree.dot(v, v)))
                hv = hessian(v)
                rayleigh = tree.dot(v, hv)
                v = hv
            return rayleigh

        return vmap(one)(phi, tasks.support_x, tasks.support_y)

    inner_cfg = config["inner_solver"]
    # With `--set inner_solver.tol=…` a GD count is a cap, as training and imaml-eval use it.
    until = f", to ‖∇G‖ ≤ {inner_cfg['tol']}" if inner_cfg["tol"] else ""
    solvers = [(f"GD, {n} steps (lr {inner_cfg['lr']}, backtracking{until})",
                GradientDescent(n, inner_cfg["lr"], inner_cfg["backtrack"], inner_cfg["tol"])) for n in args.gd]
    newton = f"{inner_cfg['curvature']}" + (f", LM from μ = {inner_cfg['lm_damping']}" if inner_cfg["lm_damping"] else "")
    solvers += [(f"HF, {n} Newton iterations x {cg} CG ({newton})",
                 NewtonCG(n, cg, config["perf"]["hvp"], inner_cfg["curvature"], inner_cfg["lm_damping"]))
                for cg in args.hf_cg or [inner_cfg["cg_steps"]] for n in args.hf]
    where = "its initialisation (train.seed)" if args.init else f"meta-step {state['step']}"
    print(f"{args.checkpoint} at {where}, {args.tasks} training tasks, λ = {lam}")
    print("| inner solver | proximal objective (median) | ‖gradient‖ at φ (median) | query accuracy | seconds "
          "| top Hessian eigenvalue at φ (median, max) | outer CG residual (median) | cosine with the first |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    first = None
    for name, inner in solvers:
        learner_now = dataclasses.replace(learner, inner=inner)
        started = time.perf_counter()
        phi, metrics = learner_now.adapt(theta, tasks)
        seconds = time.perf_counter() - started
        value, norm = objective_and_gradient_norm(tree.detach(phi))
        accuracy = 100 * metrics["post_query_accuracy"].mean().item()
        top = top_eigenvalue(tree.detach(phi)).abs()
        meta_grad, meta_metrics = learner_now.meta_gradient(theta, tasks)
        if first is None:
            first = meta_grad
        cosine = tree.dot(meta_grad, first) / (tree.norm(meta_grad) * tree.norm(first))
        print(f"| {name} | {value.median().item():.4f} | {norm.median().item():.4f} | {accuracy:.1f}% | {seconds:.1f} "
              f"| {top.median().item():.1f}, {top.max().item():.1f} | {meta_metrics['cg_residual'].median().item():.3f} "
              f"| {cosine.item():.3f} |")


if __name__ == "__main__":
    main()
