"""model=custom: any torch.nn.Module, built by Hydra from ``model._target_`` and the keys beside it.

The meta-learners call a network per task with ``torch.func.functional_call`` under ``vmap``,
passing its parameters and nothing else. State that a forward pass updates (batch norm's running
statistics, counters) cannot be threaded through those calls, so such a network is refused here,
before any training, with what to use instead.
"""

from __future__ import annotations

from torch import nn
from torch.nn.modules.batchnorm import _NormBase

from imaml_cli.errors import UserError


def build_custom_model(options: dict, num_outputs: int) -> nn.Module:
    """``hydra.utils.instantiate`` of ``options`` (``_target_`` and its keyword arguments, with or
    without the config's ``name``), called with ``num_outputs=``."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    target = options.get("_target_")
    kwargs = {key: value for key, value in options.items() if key != "name"}
    try:
        network = instantiate(kwargs, num_outputs=num_outputs)
    except InstantiationException as error:
        cause = error.__cause__ or error
        reason = " ".join(str(cause).split()) or type(cause).__name__
        raise UserError(f"model._target_={target} could not be built ({reason}); it must be importable "
                        f"(its package installed or on PYTHONPATH) and accept num_outputs= and the "
                        f"+model.KEY=VALUE arguments given") from None
    if not isinstance(network, nn.Module):
        raise UserError(f"model._target_={target} returned a {type(network).__name__}, not a torch.nn.Module")
    check_functional(network, target)
    return network


def check_functional(network: nn.Module, target: str) -> None:
    """Refuse state that per-task functional calls cannot update (UserError naming it)."""
    for name, module in network.named_modules():
        if isinstance(module, _NormBase) and module.track_running_stats:
            raise UserError(f"model._target_={target}: {name} ({type(module).__name__}) keeps running "
                            f"statistics, which the per-task functional calls of meta-learning cannot update; "
                            f"build it with track_running_stats=False (batch statistics) or use GroupNorm "
                            f"or LayerNorm")
    persistent = network.state_dict().keys() - dict(network.named_parameters()).keys()
    if persistent:
        raise UserError(f"model._target_={target} has the buffer {sorted(persistent)[0]}, state that the "
                        f"per-task functional calls of meta-learning cannot update or checkpoint; make it a "
                        f"parameter, or a constant with register_buffer(..., persistent=False)")


def check_reverse_over_reverse(network: nn.Module, target: str) -> None:
    """Refuse batch and instance norm where their double backward would run under vmap: it reads
    ``.data``, which vmap forbids (the built-in conv nets have a batch norm of their own)."""
    for name, module in network.named_modules():
        if isinstance(module, _NormBase):
            raise UserError(f"model._target_={target}: {name} ({type(module).__name__}) cannot take the "
                            f"reverse-over-reverse Hessian-vector products of perf.hvp under vmap; set "
                            f"perf.hvp=forward_over_reverse (exact, a little slower), or use GroupNorm or LayerNorm")
