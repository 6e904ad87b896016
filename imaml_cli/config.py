"""Validation of a composed config: every key, its type and its range, before any work starts.

Hydra's struct mode already refuses overrides of keys that do not exist; this catches the rest
(``+key=value`` additions, wrong types, values out of range, combinations that cannot work) and
reports each as one line that names the key and what it accepts.
"""

import difflib
import math
from typing import Any, Callable

from omegaconf import DictConfig, OmegaConf

from imaml_cli.errors import UserError

DATASETS = ("omniglot", "miniimagenet", "sinusoid", "image_folder")
# Each built-in model and the dataset it is made for; the conv nets also fit their design to an
# image folder's channels and size, and model=custom (model._target_) takes any dataset.
MODELS = {"omniglot_conv": "omniglot", "miniimagenet_conv": "miniimagenet", "sinusoid_mlp": "sinusoid",
          "custom": None}
CONV_NETS = ("omniglot_conv", "miniimagenet_conv")
ALGORITHMS = ("imaml", "maml", "fomaml", "reptile")


def _int(minimum: int) -> tuple[Callable[[Any], bool], str]:
    return (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= minimum,
            f"an integer >= {minimum}")


def _number(minimum: float, inclusive: bool) -> tuple[Callable[[Any], bool], str]:
    def check(v):
        return (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                and (v >= minimum if inclusive else v > minimum))
    return check, f"a number {'>=' if inclusive else '>'} {minimum}"


def _fraction() -> tuple[Callable[[Any], bool], str]:
    check, _ = _number(0, inclusive=True)
    return (lambda v: check(v) and v <= 1), "a number from 0 to 1"


def _choice(*options) -> tuple[Callable[[Any], bool], str]:
    return (lambda v: v in options), "one of " + ", ".join(map(str, options))


def _auto_or_int(minimum: int) -> tuple[Callable[[Any], bool], str]:
    check, accepted = _int(minimum)
    return (lambda v: v == "auto" or check(v)), f"auto or {accepted}"


def _bool() -> tuple[Callable[[Any], bool], str]:
    return (lambda v: isinstance(v, bool)), "true or false"


def _optional_int(minimum: int) -> tuple[Callable[[Any], bool], str]:
    check, accepted = _int(minimum)
    return (lambda v: v is None or check(v)), f"null or {accepted}"


def _optional_str() -> tuple[Callable[[Any], bool], str]:
    return (lambda v: v is None or (isinstance(v, str) and v != "")), "a path or null"


def _str() -> tuple[Callable[[Any], bool], str]:
    return (lambda v: isinstance(v, str) and v != ""), "a non-empty string"


def _optional_numbers(minimum: float, inclusive: bool) -> tuple[Callable[[Any], bool], str]:
    check, accepted = _number(minimum, inclusive)
    return ((lambda v: v is None or (isinstance(v, list) and len(v) > 0 and all(map(check, v)))),
            f"null or a list of numbers, each {accepted.removeprefix('a number ')}")


def _increasing_ints(minimum: int) -> tuple[Callable[[Any], bool], str]:
    check, _ = _int(minimum)
    return ((lambda v: isinstance(v, list) and all(map(check, v)) and all(a < b for a, b in zip(v, v[1:]))),
            f"a list of increasing integers >= {minimum}, e.g. [1900] or [250,600]")


def _fractions() -> tuple[Callable[[Any], bool], str]:
    check, _ = _number(0, inclusive=True)
    return ((lambda v: isinstance(v, list) and len(v) == 3 and all(map(check, v)) and abs(sum(v) - 1) < 1e-6),
            "three numbers >= 0 that sum to 1, e.g. [0.64,0.16,0.2]")


def _target() -> tuple[Callable[[Any], bool], str]:
    return ((lambda v: isinstance(v, str) and "." in v),
            "the dotted name of a torch.nn.Module class or factory, e.g. mypackage.nets.MyNet")


SCHEMA: dict[str, tuple[Callable[[Any], bool], str]] = {
    "device": _choice("auto", "cpu", "cuda"),
    "dataset.name": _choice(*DATASETS),
    "dataset.root": _optional_str(),
    "dataset.ways": _int(1),
    "dataset.shots": _int(1),
    "dataset.queries": _int(1),
    "dataset.download": _bool(),
    "dataset.rotations": _bool(),
    "dataset.cache_dir": _optional_str(),
    "model.name": _choice(*MODELS),
    "algorithm.name": _choice(*ALGORITHMS),
    "algorithm.lam": _number(0, inclusive=False),
    "algorithm.alternate_query": _bool(),
    "algorithm.zero_head": _bool(),
    "inner_steps.gd": _int(1),
    "inner_steps.hf": _int(1),
    "inner_solver.name": _choice("gd", "hf"),
    "inner_solver.steps": _int(1),
    "inner_solver.lr": _number(0, inclusive=False),
    "inner_solver.backtrack": _bool(),
    "inner_solver.tol": _number(0, inclusive=True),
    "inner_solver.cg_steps": _int(1),
    "inner_solver.curvature": _choice("hessian", "gauss_newton"),
    "inner_solver.lm_damping": _number(0, inclusive=True),
    "cg.steps": _int(1),
    "cg.damping": _number(0, inclusive=True),
    "cg.curvature": _choice("hessian", "gauss_newton"),
    "cg.stop_at_negative_curvature": _bool(),
    "cg.trust_radius": _bool(),
    "cg.solver": _choice("cg", "neumann"),
    "cg.step_size": _number(0, inclusive=False),
    "outer_optimizer.name": _choice("adam", "sgd"),
    "outer_optimizer.lr": _number(0, inclusive=False),
    "outer_optimizer.weight_decay": _number(0, inclusive=True),
    "outer_optimizer.momentum": _number(0, inclusive=True),
    "outer_optimizer.eps": _number(0, inclusive=False),
    "outer_optimizer.schedule": _choice("constant", "cosine", "step"),
    "outer_optimizer.min_lr_fraction": _fraction(),
    "outer_optimizer.milestones": _increasing_ints(1),
    "outer_optimizer.gamma": _number(0, inclusive=False),
    "outer_optimizer.warmup_steps": _int(0),
    "train.meta_steps": _int(1),
    "train.meta_batch_size": _int(1),
    "train.seed": _int(0),
    "train.val_every": _int(0),
    "train.val_episodes": _int(1),
    "train.checkpoint_every": _int(1),
    "train.log_every": _int(1),
    "train.resume": _optional_str(),
    "train.max_bad_steps": _int(1),
    "train.progress": _bool(),
    "train.curvature_tasks": _int(0),
    "train.power_iterations": _int(1),
    "eval.episodes": _int(1),
    "eval.queries": _optional_int(1),
    "eval.split": _choice("train", "val", "test"),
    "eval.seed": _int(0),
    "eval.batch_size": _int(1),
    "eval.inner_steps": _optional_int(1),
    "perf.vectorize": _bool(),
    "perf.fused": _bool(),
    "perf.hvp": _choice("forward_over_reverse", "reverse_over_reverse"),
    "perf.precision": _choice("ieee", "bf16", "tf32"),
    "perf.task_groups": _auto_or_int(1),
}

# Keys that only some choices have: required with that choice, unknown without it. A custom
# model's other keys are its constructor's arguments and are not checked here.
BUILTIN_MODEL_SCHEMA = {
    "model.activation": _choice("relu", "softplus", "tanh"),
    "model.conv_impl": _choice("im2col", "native"),
}
CHOICE_SCHEMAS = {
    ("dataset.name", "image_folder"): {
        "dataset.image_size": _int(1),
        "dataset.channels": _choice(1, 3),
        "dataset.mean": _optional_numbers(0, inclusive=True),
        "dataset.std": _optional_numbers(0, inclusive=False),
        "dataset.class_lists": _optional_str(),
        "dataset.split_fractions": _fractions(),
        "dataset.split_seed": _int(0),
    },
    ("model.name", "custom"): {"model._target_": _target()},
}

# Keys that only one entry point has.
EXTRA_KEYS = {"checkpoint": _str()}


def _flatten(node: dict, prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in node.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, path + "."))
        else:
            flat[path] = value
    return flat


def to_container(cfg: DictConfig) -> dict:
    """The config as plain, resolved Python values, without Hydra's own node."""
    try:
        plain = OmegaConf.to_container(cfg, resolve=True)
    except Exception as error:  # an interpolation that cannot resolve, e.g. a missing env var
        raise UserError(f"config cannot be resolved: {error}".splitlines()[0]) from None
    plain.pop("hydra", None)
    return plain


def unknown_key(key: str, known) -> UserError:
    """The error for a key the config does not have, naming the closest one it has."""
    close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
    fix = f"did you mean {close[0]}?" if close else "docs/configuration.md lists every key"
    return UserError(f"unknown config key '{key}'; {fix}")


def validate(cfg: DictConfig, extra_keys: tuple[str, ...] = ()) -> dict:
    """Check every key of ``cfg``; return it as a plain dict. Raises UserError on the first problem."""
    plain = to_container(cfg)
    flat = _flatten(plain)
    schema = dict(SCHEMA)
    schema.update({k: EXTRA_KEYS[k] for k in extra_keys})
    for (key, value), keys in CHOICE_SCHEMAS.items():
        if flat.get(key) == value:
            schema.update(keys)
    custom = flat.get("model.name") == "custom"
    if not custom:
        schema.update(BUILTIN_MODEL_SCHEMA)
    for key in flat:
        if key not in schema and not (custom and key.startswith("model.")):
            raise unknown_key(key, schema)
    for key, (check, accepted) in schema.items():
        if key not in flat or flat[key] == "???":  # ???: a value the config leaves to the command line
            raise UserError(f"config key '{key}' is missing; set {key}=... ({accepted})")
        if not check(flat[key]):
            raise UserError(f"{key}={flat[key]!r} is invalid: expected {accepted}")
    _check_combinations(flat)
    return plain


def _check_combinations(c: dict[str, Any]) -> None:
    dataset, model = c["dataset.name"], c["model.name"]
    fits = model == "custom" or MODELS[model] == dataset or (dataset == "image_folder" and model in CONV_NETS)
    if not fits:
        suggestion = " or ".join(m for m, d in MODELS.items() if d == dataset) or " or ".join(CONV_NETS)
        raise UserError(f"model={model} is built for {MODELS[model]} inputs but dataset={dataset}; "
                        f"use model={suggestion} or an experiment preset")
    if dataset != "sinusoid" and c["dataset.ways"] < 2:
        raise UserError(f"dataset.ways={c['dataset.ways']} is invalid: classification needs at least 2 ways")
    if dataset != "sinusoid" and c["dataset.root"] is None:
        raise UserError(f"dataset.root is null; set dataset.root=PATH to the {dataset} folder")
    if c["algorithm.name"] != "imaml" and c["inner_solver.name"] != "gd":
        raise UserError(f"algorithm={c['algorithm.name']} adapts by gradient descent; "
                        "use inner_solver=gd (hf is for imaml)")
    if (c["inner_solver.tol"] > 0 and c["inner_solver.name"] == "gd"
            and not (c["inner_solver.backtrack"] and c["algorithm.name"] == "imaml")):
        raise UserError("inner_solver.tol steers iMAML's backtracking gradient descent; "
                        "use it with algorithm=imaml and inner_solver.backtrack=true")
    if (c["outer_optimizer.schedule"] == "step") != bool(c["outer_optimizer.milestones"]):
        raise UserError("outer_optimizer.milestones go with outer_optimizer.schedule=step, and it needs them; "
                        "set both, e.g. outer_optimizer.schedule=step outer_optimizer.milestones=[1900]")
    if c["cg.trust_radius"] and c["algorithm.name"] == "imaml":
        if not c["cg.damping"] > 0:
            raise UserError(f"cg.trust_radius=true bounds CG by ‖∇L_test‖/cg.damping, so it needs cg.damping > 0 "
                            f"(got {c['cg.damping']}); set e.g. cg.damping=1, or cg.trust_radius=false")
        if c["cg.solver"] != "cg":
            raise UserError(f"cg.trust_radius=true stops conjugate gradient, not cg.solver={c['cg.solver']}; "
                            "set cg.solver=cg or cg.trust_radius=false")
    # The hand-written batched passes (models/fused.py) cover the built-in ReLU conv nets.
    fused = (model in CONV_NETS and c.get("model.activation") == "relu" and c["perf.fused"] and c["perf.vectorize"])
    if c["cg.curvature"] == "gauss_newton" and c["algorithm.name"] == "imaml" and not fused:
        raise UserError("cg.curvature=gauss_newton runs on the fused passes only; use a built-in conv net "
                        "(model.activation=relu) with perf.fused=true and perf.vectorize=true, or cg.curvature=hessian")
    batched_only = c["inner_solver.curvature"] == "gauss_newton" or c["inner_solver.lm_damping"] > 0
    if c["inner_solver.name"] == "hf" and batched_only and not fused:
        raise UserError("inner_solver.curvature=gauss_newton and inner_solver.lm_damping run on the fused passes only; "
                        "use a built-in conv net (model.activation=relu) with perf.fused=true and perf.vectorize=true, "
                        "or inner_solver.curvature=hessian and inner_solver.lm_damping=0")
    if dataset == "image_folder":
        _check_image_folder(c)
    if (c["perf.hvp"] == "reverse_over_reverse" and c.get("model.conv_impl") == "native" and c["perf.vectorize"]
            and dataset != "sinusoid"):
        raise UserError("perf.hvp=reverse_over_reverse cannot run with model.conv_impl=native under vmap "
                        "(batch norm's double backward); use model.conv_impl=im2col or perf.hvp=forward_over_reverse")
    if c["dataset.download"] and dataset == "miniimagenet":
        raise UserError("dataset.download=true is not possible for miniimagenet (no official download); "
                        "set dataset.download=false and put the data under dataset.root")


def _check_image_folder(c: dict[str, Any]) -> None:
    if c["dataset.download"]:
        raise UserError("dataset.download=true is not possible for image_folder (your own images); "
                        "set dataset.download=false")
    mean, std, channels = c["dataset.mean"], c["dataset.std"], c["dataset.channels"]
    if (mean is None) != (std is None):
        raise UserError("dataset.mean and dataset.std go together: set both (one number per channel) or "
                        "neither (pixels scaled to [0, 1])")
    for key, values in (("dataset.mean", mean), ("dataset.std", std)):
        if values is not None and len(values) != channels:
            raise UserError(f"{key} has {len(values)} values but dataset.channels={channels}; give one per channel")
    if c["model.name"] == "miniimagenet_conv" and c["dataset.image_size"] < 16:
        raise UserError(f"model=miniimagenet_conv halves the image by max-pooling four times and needs "
                        f"dataset.image_size >= 16, not {c['dataset.image_size']}; use model=omniglot_conv "
                        f"(stride 2) or larger images")
