"""The pieces of a run, built from a validated config: device, network, learner, optimizer, data."""

import torch

from imaml_cli.config import CHOICE_SCHEMAS
from imaml_cli.data import make_episode_source
from imaml_cli.errors import UserError
from imaml_cli.meta.algorithms import MetaLearner
from imaml_cli.meta.inner import GradientDescent, NewtonCG
from imaml_cli.meta.precision import SUPPORTED
from imaml_cli.meta.task import TaskModel
from imaml_cli.models import build_custom_model, build_model
from imaml_cli.models.custom import check_reverse_over_reverse


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("device=cuda but no CUDA device is available; use device=cpu or device=auto")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def task_kind(config: dict) -> str:
    return "regression" if config["dataset"]["name"] == "sinusoid" else "classification"


def num_outputs(config: dict) -> int:
    return 1 if task_kind(config) == "regression" else config["dataset"]["ways"]


def build_network(config: dict, device: torch.device) -> torch.nn.Module:
    """The network with its initial parameters, drawn from ``train.seed`` (the output layer zero
    with ``algorithm.zero_head``)."""
    outputs = num_outputs(config)
    torch.manual_seed(config["train"]["seed"])
    model = config["model"]
    if model["name"] == "custom":
        network = build_custom_model(model, outputs)
    else:
        image = {}
        if config["dataset"]["name"] == "image_folder":  # the conv net's design, fitted to the folder's images
            image = dict(in_channels=config["dataset"]["channels"], image_size=config["dataset"]["image_size"])
        network = build_model(model["name"], outputs, model["activation"], model["conv_impl"], **image)
    network = network.to(device)
    set_to_zero(network, held_at_zero(config, network))
    return network


def held_at_zero(config: dict, network: torch.nn.Module) -> tuple[str, ...]:
    """The names of the parameters ``algorithm.zero_head`` holds at zero: θ's output layer, the
    network's last ``nn.Linear`` in registration order, which must map to the task's outputs (none
    without the setting).

    Why: a task's labels are a random permutation of its classes, so a meta-learned head can carry
    nothing that helps every task; what meta-training puts there only scales the support loss's
    curvature at φ (a larger head, a sharper inner problem) or makes θ's predictions confidently
    wrong before adaptation. Held at zero, θ predicts uniformly and each task's head starts from
    zero, pulled back to it by the proximal term (the zeroing trick of Kao et al. 2022, "MAML is a
    noisy contrastive learner in classification")."""
    if not config["algorithm"]["zero_head"]:
        return ()
    outputs = num_outputs(config)
    linear = [(name, module) for name, module in network.named_modules() if isinstance(module, torch.nn.Linear)]
    if not linear or linear[-1][1].out_features != outputs:
        raise UserError(f"algorithm.zero_head=true needs a network whose last nn.Linear is its output layer "
                        f"({outputs} outputs); this one has none such, so set algorithm.zero_head=false")
    name, layer = linear[-1]
    return tuple(f"{name}.{k}" for k, _ in layer.named_parameters())


def set_to_zero(network: torch.nn.Module, names: tuple[str, ...]) -> bool:
    """Zero the named parameters in place; whether any of them was not zero already."""
    params = dict(network.named_parameters())
    changed = any(bool(torch.count_nonzero(params[name])) for name in names)
    with torch.no_grad():
        for name in names:
            params[name].zero_()
    return changed


def evaluation_config(config: dict) -> dict:
    """``config`` as validation and test run it: ``eval.inner_steps``, where set, in place of
    ``inner_solver.steps`` (a run may adapt with more steps than it meta-trains with)."""
    steps = config["eval"].get("inner_steps")
    if steps is None:
        return config
    return {**config, "inner_solver": {**config["inner_solver"], "steps": steps},
            "eval": {**config["eval"], "inner_steps": None}}


def build_learner(config: dict, network: torch.nn.Module, device: torch.device) -> MetaLearner:
    inner_cfg = config["inner_solver"]
    perf = config["perf"]
    if perf["precision"] not in SUPPORTED.get(device.type, ("ieee",)):
        raise UserError(f"perf.precision={perf['precision']} is not available on {device.type}; "
                        f"use one of {', '.join(SUPPORTED.get(device.type, ('ieee',)))}")
    hvp = perf["hvp"]
    # Groups share a CPU's cores; on a GPU one batch keeps the device busy.
    task_groups = 1 if device.type != "cpu" else perf["task_groups"]
    if task_groups == "auto":
        task_groups = torch.get_num_threads()
    if inner_cfg["name"] == "gd":
        # MAML, FOMAML and Reptile take their papers' plain steps (MAML differentiates through them).
        backtrack = inner_cfg["backtrack"] and config["algorithm"]["name"] == "imaml"
        inner = GradientDescent(inner_cfg["steps"], inner_cfg["lr"], backtrack, inner_cfg["tol"] if backtrack else 0.0)
    else:
        inner = NewtonCG(inner_cfg["steps"], inner_cfg["cg_steps"], hvp, inner_cfg["curvature"], inner_cfg["lm_damping"])
    custom = config["model"]["name"] == "custom"
    if custom and hvp == "reverse_over_reverse" and perf["vectorize"] and config["algorithm"]["name"] == "imaml":
        check_reverse_over_reverse(network, config["model"]["_target_"])
    return MetaLearner(TaskModel(network, task_kind(config)), config["algorithm"]["name"], inner,
                       lam=config["algorithm"]["lam"], alternate_query=config["algorithm"]["alternate_query"],
                       cg_steps=config["cg"]["steps"],
                       cg_damping=config["cg"]["damping"],
                       cg_stop_at_negative_curvature=config["cg"]["stop_at_negative_curvature"],
                       cg_trust_radius=config["cg"]["trust_radius"],
                       cg_solver=config["cg"]["solver"], cg_curvature=config["cg"]["curvature"],
                       neumann_step_size=config["cg"]["step_size"], hvp_mode=hvp,
                       # The hand-written passes are for the built-in conv nets; a custom network (even a
                       # ConvNet subclass with its own forward) runs through vmap.
                       vectorize=perf["vectorize"], fused=perf["fused"] and not custom,
                       precision=perf["precision"], task_groups=task_groups)


def build_optimizer(config: dict, parameters) -> torch.optim.Optimizer:
    opt = config["outer_optimizer"]
    if opt["name"] == "adam":
        return torch.optim.Adam(parameters, lr=opt["lr"], weight_decay=opt["weight_decay"], eps=opt["eps"])
    return torch.optim.SGD(parameters, lr=opt["lr"], momentum=opt["momentum"], weight_decay=opt["weight_decay"])


def build_source(config: dict, split: str, device: torch.device, evaluation: bool = False):
    """Episodes of ``split``. Meta-training episodes hold ``dataset.queries`` query examples per
    class; with ``evaluation`` (validation and test) they hold ``eval.queries`` when it is set, so a
    checkpoint can be tested on another protocol than the one it was trained on."""
    data = config["dataset"]
    queries = data["queries"]
    if evaluation and config["eval"]["queries"] is not None:
        queries = config["eval"]["queries"]
    folder = {}
    if data["name"] == "image_folder":  # its own keys: image_size, channels, mean, std, how to split
        names = (key.removeprefix("dataset.") for key in CHOICE_SCHEMAS[("dataset.name", "image_folder")])
        folder = {name: data[name] for name in names}
    return make_episode_source(data["name"], split, root=data["root"], ways=data["ways"], shots=data["shots"],
                               queries=queries, device=device, download=data["download"],
                               cache_dir=data["cache_dir"], rotations=data["rotations"], **folder)
