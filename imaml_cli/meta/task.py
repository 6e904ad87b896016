"""Per-task losses of a network called functionally: the objective every algorithm optimises."""

from dataclasses import dataclass
from functools import cached_property

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from imaml_cli.meta.tree import Params
from imaml_cli.models.fused import FusedConvNet

KINDS = ("classification", "regression")


@dataclass(frozen=True)
class TaskModel:
    """A network and the kind of task it solves; ``loss`` and ``metrics`` act on one task's data."""

    network: nn.Module
    kind: str

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown task kind {self.kind!r}; expected one of {KINDS}")

    def parameters(self) -> Params:
        return {name: p.detach() for name, p in self.network.named_parameters()}

    def outputs(self, params: Params, x: torch.Tensor) -> torch.Tensor:
        return functional_call(self.network, params, (x,))

    def loss(self, params: Params, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.loss_of_outputs(self.outputs(params, x), y)

    def loss_and_accuracy(self, params: Params, x: torch.Tensor, y: torch.Tensor):
        """(loss, accuracy); accuracy is None for regression."""
        return self.loss_and_accuracy_of_outputs(self.outputs(params, x), y)

    def loss_and_accuracy_of_outputs(self, out: torch.Tensor, y: torch.Tensor):
        accuracy = self.accuracy_of_outputs(out, y) if self.kind == "classification" else None
        return self.loss_of_outputs(out, y), accuracy

    @staticmethod
    def accuracy_of_outputs(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The accuracy of class scores ``[..., n, classes]``: one task's, or ``[T]`` for a batch."""
        return (out.argmax(-1) == y).to(out.dtype).mean(-1)

    @cached_property
    def fused(self) -> FusedConvNet | None:
        """The hand-written batched gradient of this network, where there is one."""
        return FusedConvNet(self.network, self.kind) if FusedConvNet.supports(self.network, self.kind) else None

    def batched_loss_of_outputs(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``loss_of_outputs`` per task for outputs ``[T, n, ...]``, in one call rather than vmap's
        per-op dispatch (it runs once per inner step)."""
        if self.kind == "classification":
            return F.cross_entropy(out.transpose(1, 2), y, reduction="none").mean(1)
        return (out - y).square().flatten(1).mean(1)

    def loss_of_outputs(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.kind == "classification":
            return F.cross_entropy(out, y)
        # Not F.mse_loss: its backward breaks forward-mode AD (jvp of grad raises "ZeroTensors are
        # immutable" in torch 2.14), which Hessian-vector products need.
        return (out - y).square().mean()
