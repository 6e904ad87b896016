"""Meta-training: episodes -> meta-gradient -> outer step, with validation, checkpoints and logs.

``train(cfg, run_dir)`` is the whole run as a plain function; the Hydra entry point only calls it.
Resuming is automatic: a run directory that holds ``checkpoints/last.pt`` continues from it.
"""

import collections
import logging
import math
import signal
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.contrib.logging import logging_redirect_tqdm

from imaml_cli.config import validate
from imaml_cli.engine import components
from imaml_cli.engine.checkpoint import load_checkpoint, load_params, save_checkpoint
from imaml_cli.engine.distributed import Distributed
from imaml_cli.engine.evaluation import EvalResult, evaluate
from imaml_cli.engine.evaluation_run import NO_EFFECT_ON_EVALUATION
from imaml_cli.engine.logging import TensorBoard, flat_hparams, mean_metrics, report, write_json
from imaml_cli.engine.schedule import outer_learning_rate
from imaml_cli.errors import UserError
from imaml_cli.meta.algorithms import MetaLearner

log = logging.getLogger("imaml")

# Keys a resumed run may change without breaking exact continuation. inner_steps only feeds
# inner_solver.steps, which is compared itself.
RESUMABLE_CHANGES = ("train.meta_steps", "train.progress", "train.resume", "device", "dataset.root",
                     "dataset.cache_dir", "dataset.download", "eval.episodes", "eval.split", "eval.batch_size",
                     "eval.inner_steps", "inner_steps.gd", "inner_steps.hf", "perf.task_groups",
                     "train.curvature_tasks", "train.power_iterations")
# Keys that leave a validation score as it was: where a resumed run differs from the settings its
# best checkpoint was scored under in any other key, that checkpoint is validated again.
NO_EFFECT_ON_VALIDATION = (*NO_EFFECT_ON_EVALUATION, "inner_steps.", "dataset.root", "dataset.cache_dir",
                           "dataset.download", "device", "perf.", "eval.episodes", "eval.split", "eval.batch_size")
# Per-task metrics whose largest value over the meta-batch is logged beside the mean.
PEAK_METRICS = ("inner_grad_norm",)
# The measurements of iMAML's assumptions that results.json reports, averaged over the last
# meta-steps of the run (README: "Is the inner problem solved?").
ASSUMPTIONS = ("inner_grad_norm", "inner_grad_norm_max", "inner_halvings", "inner_step", "cg_residual",
               "cg_negative_curvature", "cg_radius_stop")
ASSUMPTIONS_WINDOW = 100
# Keys that fix the parameters' shapes: a checkpoint cannot serve a config that differs in them.
SHAPE_KEYS = ("dataset.name", "dataset.ways", "model.name")


# SIGUSR2 is the signal submitit (Hydra's SLURM launcher) sends before a job's time limit.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR2)


class Interrupted(Exception):
    """A stop signal arrived; the run saved a checkpoint and stops with exit status 128 + signum."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.exit_code = 128 + signum


def _get(config: dict, dotted: str):
    for part in dotted.split("."):
        config = config[part]
    return config


def check_compatible(stored: dict, current: dict, keys, path: Path, advice: str) -> None:
    for key in keys:
        if _get(stored, key) != _get(current, key):
            raise UserError(f"checkpoint {path} was trained with {key}={_get(stored, key)!r} but this run has "
                            f"{key}={_get(current, key)!r}; {advice}")


def _differing_keys(stored: dict, current: dict, prefix: str = "") -> list[str]:
    """Keys whose values differ; not those the stored config lacks (``_newer_keys``)."""
    keys = []
    for key in sorted(set(stored) | set(current)):
        a, b = stored.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += _differing_keys(a, b, f"{prefix}{key}.")
        elif key in stored and a != b:
            keys.append(f"{prefix}{key}")
    return keys


def _newer_keys(stored: dict, current: dict, prefix: str = "") -> dict:
    """Settings added since the checkpoint was written, with this run's values. A resume goes on
    with them and says so: most defaults keep the old behaviour, but not all (algorithm.alternate_query
    changes Reptile's inner loop), and one may have been set otherwise."""
    found = {}
    for key, value in current.items():
        if key not in stored:
            found.update(_flat(value, f"{prefix}{key}"))
        elif isinstance(value, dict) and isinstance(stored[key], dict):
            found.update(_newer_keys(stored[key], value, f"{prefix}{key}."))
    return found


def _flat(value, path: str) -> dict:
    if not isinstance(value, dict):
        return {path: value}
    return {k: v for key, item in value.items() for k, v in _flat(item, f"{path}.{key}").items()}


@contextmanager
def stop_on_signals():
    """A stop signal sets a flag that the loop checks after each meta-step; a second one aborts.

    Yields the received signals and the handlers that were installed before.
    """
    received = []

    def handler(signum, _frame):
        if received:
            raise KeyboardInterrupt
        received.append(signum)

    previous = {s: signal.signal(s, handler) for s in STOP_SIGNALS}
    try:
        yield received, previous
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def pass_on(signum: int, handler) -> None:
    """Give a signal, once the checkpoint is saved, to the handler that was there before the run:
    submitit's handler of SIGUSR2 requeues the job and exits. Python's own SIGINT handler would
    only turn the orderly stop into a KeyboardInterrupt."""
    if callable(handler) and handler is not signal.default_int_handler:
        handler(signum, None)


def rng_state(generator: torch.Generator) -> dict:
    state = {"sampler": generator.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict, generator: torch.Generator) -> None:
    generator.set_state(state["sampler"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def train(cfg: DictConfig, run_dir: Path) -> float:
    """Meta-train as ``cfg`` says, writing into ``run_dir``; returns the best validation score.

    The score is the validation accuracy in % (classification) or MSE (regression), or the test
    one when validation is off. Under torchrun every rank calls it, and rank 0's ``run_dir`` counts.
    """
    config = validate(cfg)
    world = Distributed.start(components.resolve_device(config["device"]))
    try:
        return _train(config, world.shared_folder(Path(run_dir)), world)
    finally:
        world.close()


def _train(config: dict, run_dir: Path, world: Distributed) -> float:
    device = world.device
    last_path = run_dir / "checkpoints" / "last.pt"
    best_path = run_dir / "checkpoints" / "best.pt"
    results_path = run_dir / "results.json"
    tcfg = config["train"]

    resumed = None
    if last_path.exists():
        resumed = load_checkpoint(last_path, advice=(
            f"move it away and run the same command with train.resume={best_path} to go on from the best "
            f"checkpoint, or choose a new hydra.run.dir to start over" if best_path.exists() else
            f"remove it to start this run over, or choose a new hydra.run.dir"))
        stored = OmegaConf.to_container(OmegaConf.create(resumed["config"]))
        changed = [k for k in _differing_keys(stored, config) if k not in RESUMABLE_CHANGES]
        if changed:
            raise UserError(f"run directory {run_dir} holds a run with other settings ({', '.join(changed[:4])}); "
                            "repeat its command to resume it, or choose a new hydra.run.dir")
        newer = _newer_keys(stored, config)
        if newer and world.is_main:
            log.warning("the checkpoint predates %s; the run goes on with %s", ", ".join(newer),
                        ", ".join(f"{k}={v}" for k, v in newer.items()))
        if (config["outer_optimizer"]["schedule"] == "cosine" and world.is_main
                and stored["train"]["meta_steps"] != tcfg["meta_steps"]):
            log.warning("train.meta_steps changed from %d to %d: the cosine schedule decays to the new end from here",
                        stored["train"]["meta_steps"], tcfg["meta_steps"])
        if resumed["step"] >= tcfg["meta_steps"] and results_path.exists():
            import json

            result = json.loads(results_path.read_text())
            if world.is_main:
                print(f"run already finished at meta-step {resumed['step']}: "
                      f"{EvalResult(**result['test']).line()}")
            return result["score"]
    elif tcfg["resume"]:
        resumed = load_checkpoint(Path(tcfg["resume"]))
        stored = OmegaConf.to_container(OmegaConf.create(resumed["config"]))
        check_compatible(stored, config, SHAPE_KEYS, Path(tcfg["resume"]),
                         "resume only with the same dataset, ways and model")

    network = components.build_network(config, device)
    learner = components.build_learner(config, network, device)
    scoring = components.evaluation_config(config)
    # Validation and test adapt with eval.inner_steps where set; meta-training with inner_solver.steps.
    eval_learner = learner if scoring is config else components.build_learner(scoring, network, device)
    held_at_zero = components.held_at_zero(config, network)
    params = dict(network.named_parameters())
    optimizer = components.build_optimizer(config, params.values())
    generator = torch.Generator().manual_seed(tcfg["seed"])
    train_source, val_source = world.main_first(lambda: (
        components.build_source(config, "train", device),
        components.build_source(config, "val", device, evaluation=True) if tcfg["val_every"] else None))

    step, best, best_step, bad_steps, skipped, elapsed = 0, None, None, 0, 0, 0.0
    # The other run's checkpoint this run went on from ({"path", "step"}), kept in every checkpoint:
    # that file may be overwritten later, and plots join the two runs' curves at this step.
    branched_from, continues_another = None, False
    recent = collections.deque(maxlen=ASSUMPTIONS_WINDOW)  # each meta-step's ASSUMPTIONS
    # The largest finite meta-gradient norm since the last TensorBoard write: one task's runaway
    # meta-gradient lasts a single meta-step, which a scalar written every log_every steps misses.
    peak_grad_norm = 0.0
    curvature = None  # the last validation's top Hessian eigenvalue at φ (median over tasks)
    if resumed is not None:
        source = last_path if last_path.exists() else Path(tcfg["resume"]).resolve()
        load_params(network, resumed, source)
        if "optimizer" in resumed:
            optimizer.load_state_dict(resumed["optimizer"])
            restore_rng(resumed["rng"], generator)
            step, best, best_step = resumed["step"], resumed.get("best_score"), resumed.get("best_step")
            skipped, elapsed = resumed.get("skipped_steps", 0), resumed.get("elapsed", 0.0)
            continues_another = source != last_path
            branched_from = ({"path": str(source), "step": step} if continues_another
                             else resumed.get("branched_from"))
            if world.is_main:
                log.info("resuming from %s at meta-step %d", source, step)
        elif world.is_main:
            # A parameters-only file (pretrained/): fine-tune from its θ with a fresh optimizer.
            log.info("starting from the parameters in %s (meta-step %d there) with a new optimizer",
                     tcfg["resume"], resumed["step"])

    higher_is_better = components.task_kind(config) == "classification"

    config_yaml = OmegaConf.to_yaml(OmegaConf.create(config))

    def state() -> dict:
        return {"step": step, "params": {k: v.detach().cpu() for k, v in params.items()},
                "optimizer": optimizer.state_dict(), "rng": rng_state(generator),
                "config": config_yaml, "best_score": best,
                "best_step": best_step, "skipped_steps": skipped, "elapsed": elapsed,
                "branched_from": branched_from}

    def checkpoint(path: Path) -> None:
        if world.is_main:
            save_checkpoint(state(), path)
        # No rank may exit before the file is whole: torchrun stops the others when one exits.
        world.barrier()

    # A run that goes on with zero_head from a state with another head: its best so far was scored
    # by a θ this run no longer has.
    if components.set_to_zero(network, held_at_zero) and best_step is not None:
        best, best_step = _forget_best(best_path, world, f"algorithm.zero_head set the output layer of {source} "
                                                         f"(meta-step {step}) to zero")
    elif continues_another and best_step is not None:
        best, best_step, scored_under = _carry_best(source, resumed, best, best_step, best_path, checkpoint,
                                                    config_yaml, world)
        best = _rescore_best(scored_under, config, best, best_step, best_path, eval_learner, val_source,
                             device, world)
    elif best_step is not None and best_path.exists():
        best = _rescore_best(load_checkpoint(best_path)["config"], config, best, best_step, best_path,
                             eval_learner, val_source, device, world)
    if world.is_main:
        print(f"run folder: {run_dir}", flush=True)
    progress = _progress_bar(tcfg, step, enabled=world.is_main)
    try:
        with stop_on_signals() as (signals, handlers), logging_redirect_tqdm():
            # Made once the stop handlers are in place: its event file tells a supervisor (and the
            # tests) that a signal from now on ends in a checkpoint.
            tb = TensorBoard(run_dir, step) if world.is_main else None
            while step < tcfg["meta_steps"]:
                started = time.perf_counter()
                batch, local, total = world.shard(train_source.sample(tcfg["meta_batch_size"], generator))
                grads, metrics = learner.meta_gradient(params, batch)
                grads = {k: v for k, v in world.average(grads, local, total).items() if k not in held_at_zero}
                summary = world.average({k: v.float().mean() for k, v in metrics.items()}, local, total)
                summary.update(world.maximum({f"{k}_max": metrics[k].float().max() for k in PEAK_METRICS
                                              if k in metrics}))
                grad_norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads.values()))
                finite = torch.isfinite(grad_norm) and all(torch.isfinite(v) for v in summary.values())
                lr = outer_learning_rate(config["outer_optimizer"], step + 1, tcfg["meta_steps"])
                if finite:
                    for name, p in params.items():
                        # No gradient: the optimizer leaves the parameter (and its state) alone.
                        p.grad = grads[name].to(p.dtype) if name in grads else None
                    for group in optimizer.param_groups:
                        group["lr"] = lr
                    optimizer.step()
                    bad_steps = 0
                else:
                    bad_steps, skipped = bad_steps + 1, skipped + 1
                    if world.is_main:
                        log.warning("meta-step %d: non-finite loss or meta-gradient; step skipped (%d in a row)",
                                    step + 1, bad_steps)
                step += 1
                seconds = time.perf_counter() - started
                elapsed += seconds
                if world.is_main:
                    summary = {k: v.item() for k, v in summary.items()}
                    recent.append({k: summary[k] for k in ASSUMPTIONS if k in summary})
                    if finite:
                        peak_grad_norm = max(peak_grad_norm, grad_norm.item())
                    progress.update(1)
                    progress.set_postfix(_postfix(summary, best), refresh=False)
                    if step % tcfg["log_every"] == 0 or step == tcfg["meta_steps"]:
                        tb.training_scalars({**summary, "meta_grad_norm": grad_norm.item(),
                                             "meta_grad_norm_peak": peak_grad_norm, "outer_lr": lr,
                                             "seconds_per_step": seconds, "skipped_steps": skipped}, step)
                        peak_grad_norm = 0.0
                if bad_steps >= tcfg["max_bad_steps"]:
                    checkpoint(last_path)
                    raise UserError(f"{bad_steps} meta-steps in a row had a non-finite loss or meta-gradient "
                                    f"(at meta-step {step}); the last good state is in {last_path}; "
                                    "lower outer_optimizer.lr or inner_solver.lr")
                if val_source is not None and step % tcfg["val_every"] == 0:
                    result = evaluate(eval_learner, params, val_source, episodes=tcfg["val_episodes"],
                                      seed=config["eval"]["seed"], batch_size=config["eval"]["batch_size"],
                                      split="val", shard=(world.rank, world.world), gather=world.gather_lists)
                    improved = best is None or (result.mean > best if higher_is_better else result.mean < best)
                    if improved:
                        best, best_step = result.mean, step
                    if tcfg["curvature_tasks"] and world.is_main:
                        tasks = val_source.sample(tcfg["curvature_tasks"],
                                                  torch.Generator().manual_seed(config["eval"]["seed"]))
                        curvature = learner.top_hessian_eigenvalue(params, tasks, tcfg["power_iterations"]).median().item()
                    if world.is_main:
                        tb.scalars("val", {result.metric: result.mean, f"{result.metric}_ci95": result.ci95,
                                          "train_seconds": elapsed,
                                          **({"top_hessian_eigenvalue": curvature} if curvature is not None else {})},
                                   step)
                        progress.set_postfix(_postfix(summary, best), refresh=False)
                        log.info("meta-step %d: %s", step, result.line())
                    if improved:
                        checkpoint(best_path)
                if step % tcfg["checkpoint_every"] == 0:
                    checkpoint(last_path)
                signum = world.largest(signals[0] if signals else 0)
                if signum:
                    checkpoint(last_path)
                    pass_on(signum, handlers[signum])
                    raise Interrupted(signum, f"{signal.Signals(signum).name} at meta-step {step}: "
                                      f"checkpoint saved to {last_path}; run the same command again to resume")
            checkpoint(last_path)
    finally:
        progress.close()
    assumptions = {k: sum(r[k] for r in recent) / len(recent) for k in ASSUMPTIONS if recent and k in recent[-1]}
    if curvature is not None:
        assumptions["top_hessian_eigenvalue"] = curvature
    return _finish(config, eval_learner, network, params, best, best_step, step, elapsed, skipped, world, tb,
                   best_path, results_path, device, assumptions)


def _carry_best(source: Path, resumed: dict, best, best_step: int, best_path: Path, checkpoint, config: str,
                world: Distributed):
    """A run continued in a new folder from another's checkpoint keeps that run's best validation
    only together with its checkpoint, so that the test at the end uses the state the score belongs
    to: the resumed state itself when it is the best, else the best.pt beside it (under this run's
    config, as the other path writes it). Without either, the best is counted afresh from this
    folder's validations, and a best.pt of an earlier attempt of this run (killed before its first
    last.pt) is removed. Every rank sees the same files (``Distributed.shared_folder``). Returns the
    best score, its step and the config it was scored under."""
    if best_step == resumed["step"]:
        checkpoint(best_path)
        return best, best_step, resumed["config"]
    beside = source.parent / "best.pt"
    try:
        kept = load_checkpoint(beside) if beside.exists() else None
    except UserError:
        kept = None
    if kept is not None and kept.get("step") == best_step:
        if world.is_main:
            save_checkpoint({**kept, "config": config}, best_path)
        world.barrier()
        return best, best_step, kept["config"]
    return *_forget_best(best_path, world, f"the best validation of the run resumed from (meta-step {best_step}) "
                                           f"has no readable checkpoint beside {source}"), None


def _rescore_best(scored_under: str | None, config: dict, best, best_step, best_path: Path, learner: MetaLearner,
                  val_source, device: torch.device, world: Distributed):
    """The best score to beat from here: as carried, or, where this run validates otherwise than the
    settings the best checkpoint was scored under (more inner steps at evaluation, say), that
    checkpoint validated again as this run validates, so that later validations compare like with
    like. best.pt then holds this run's config, as every checkpoint the run writes."""
    if scored_under is None or val_source is None:
        return best
    before = components.evaluation_config(OmegaConf.to_container(OmegaConf.create(scored_under)))
    changed = [key for key in _differing_keys(before, components.evaluation_config(config))
               if key == "train.val_episodes" or not key.startswith(NO_EFFECT_ON_VALIDATION)]
    if not changed:
        return best
    state = load_checkpoint(best_path)
    theta = {name: value.to(device) for name, value in state["params"].items()}
    tcfg, ecfg = config["train"], config["eval"]
    result = evaluate(learner, theta, val_source, episodes=tcfg["val_episodes"], seed=ecfg["seed"],
                      batch_size=ecfg["batch_size"], split="val", shard=(world.rank, world.world),
                      gather=world.gather_lists)
    if world.is_main:
        save_checkpoint({**state, "config": OmegaConf.to_yaml(OmegaConf.create(config)), "best_score": result.mean},
                        best_path)
        log.info("the best checkpoint (meta-step %d) scored %s under other settings (%s); validated again as this "
                 "run validates: %s", best_step, best, ", ".join(changed[:4]), result.line())
    world.barrier()
    return result.mean


def _forget_best(best_path: Path, world: Distributed, why: str):
    """No best validation yet, and no best.pt (one of an earlier attempt would be tested at the end)."""
    if world.is_main:
        best_path.unlink(missing_ok=True)
        log.warning("%s; this run's best is counted from its own validations", why)
    world.barrier()
    return None, None


def _finish(config, learner, network, params, best, best_step, step, elapsed, skipped, world, tb,
            best_path, results_path, device, assumptions: dict) -> float:
    """Test the best checkpoint (the last state when no validation ran) and write results.json."""
    used = "last"
    if best_path.exists():
        load_params(network, load_checkpoint(best_path), best_path)
        used = "best"
    ecfg = config["eval"]
    source = world.main_first(lambda: components.build_source(config, ecfg["split"], device, evaluation=True))
    result = evaluate(learner, params, source, episodes=ecfg["episodes"], seed=ecfg["seed"],
                      batch_size=ecfg["batch_size"], split=ecfg["split"], shard=(world.rank, world.world),
                      gather=world.gather_lists, progress=world.is_main and config["train"]["progress"])
    score = best if best is not None else result.mean
    if world.is_main:
        report(result.line(), f"{result.line()} (checkpoint: {used})")
        write_json(results_path, {"test": result.to_dict(), "score": score, "best_val": best,
                                  "best_step": best_step, "meta_steps": step, "checkpoint": used,
                                  "wall_clock_s": elapsed, "skipped_steps": skipped,
                                  "assumptions": {"last_meta_steps": ASSUMPTIONS_WINDOW, **assumptions}})
        tb.hparams(flat_hparams(config), {f"hparam/{result.split}_{result.metric}": result.mean,
                                          **({"hparam/val_best": best} if best is not None else {})})
        tb.close()
        print(f"written: {results_path}, checkpoints/ and tb/ in {results_path.parent}", flush=True)
    world.barrier()
    return score


def _progress_bar(tcfg: dict, step: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=tcfg["meta_steps"], initial=step, desc="meta-train", unit="step", dynamic_ncols=True,
                disable=not (enabled and tcfg["progress"]), mininterval=1.0)


def _postfix(summary: dict, best) -> dict:
    out = {"loss": f"{summary.get('post_query_loss', math.nan):.3f}"}
    if "post_query_accuracy" in summary:
        out["acc"] = f"{100 * summary['post_query_accuracy']:.1f}"
    if "inner_grad_norm" in summary:  # how far φ is from the inner problem's minimiser
        out["|∇G|"] = f"{summary['inner_grad_norm']:.3f}"
    if best is not None:
        out["val"] = f"{best:.2f}" if "post_query_accuracy" in summary else f"{best:.4f}"
    return out
