"""Meta-learning algorithms behind one interface: θ and a batch of tasks in, meta-gradient out.

Every algorithm is written for one task and mapped over the tasks of a meta-batch with ``vmap``
(or, for reference and benchmarks, a plain Python loop over the same per-task function).

- ``imaml``: adapt φ by the inner solver on L̂(φ) + λ/2‖φ − θ‖², then solve
  (I + ∇²L̂(φ)/λ) g = ∇L_test(φ) by CG with Hessian-vector products (Rajeswaran et al. 2019).
  Nothing is differentiated through the inner loop.
- ``maml``: differentiate L_test(φ(θ)) through the inner GD steps (Finn et al. 2017).
- ``fomaml``: ∇L_test(φ), MAML's first-order approximation.
- ``reptile``: θ − φ, the Reptile update as a gradient for the outer optimizer (Nichol et al. 2018).
"""

from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch
from torch.func import grad, vmap

from imaml_cli.meta import tree
from imaml_cli.meta.cg import conjugate_gradient
from imaml_cli.meta.hvp import hessian_vector_product
from imaml_cli.meta.inner import GradientDescent, InnerSolver
from imaml_cli.meta.task import TaskModel
from imaml_cli.meta.tree import Params

ALGORITHMS = ("imaml", "maml", "fomaml", "reptile")


class Tasks(NamedTuple):
    """Support and query sets of T tasks: inputs ``[T, n, ...]``, targets ``[T, n, ...]``."""

    support_x: torch.Tensor
    support_y: torch.Tensor
    query_x: torch.Tensor
    query_y: torch.Tensor


@dataclass(frozen=True)
class MetaLearner:
    """One algorithm with its settings. ``lam``, ``cg_steps`` and ``cg_damping`` matter to iMAML only.

    ``cg_damping`` adds δ·I to the CG matrix, I + ∇²L̂/λ + δI; it is 0 (the paper's system) unless
    set. ``vectorize=False`` processes the tasks in a Python loop, as a reference for the batched path.
    """

    model: TaskModel
    algorithm: str
    inner: InnerSolver
    lam: float = 1.0
    cg_steps: int = 5
    cg_damping: float = 0.0
    hvp_mode: str = "forward_over_reverse"
    vectorize: bool = True

    def __post_init__(self):
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"unknown algorithm {self.algorithm!r}; expected one of {ALGORITHMS}")
        if self.algorithm != "imaml" and not isinstance(self.inner, GradientDescent):
            raise ValueError(f"algorithm {self.algorithm!r} adapts by gradient descent; use the gd inner solver")
        if self.algorithm == "imaml" and not self.lam > 0:
            raise ValueError(f"iMAML needs lam > 0, got {self.lam}")

    @property
    def inner_lam(self) -> float:
        """The proximal weight of the inner problem: iMAML's λ, none for the others."""
        return self.lam if self.algorithm == "imaml" else 0.0

    def adapt(self, theta: Params, tasks: Tasks) -> tuple[Params, dict[str, torch.Tensor]]:
        """Adapted parameters per task ``[T, ...]`` and per-task metrics, without a meta-gradient."""
        theta = tree.detach(theta)

        def one_task(xs, ys):
            return self.inner(lambda p: self.model.loss(p, xs, ys), theta, self.inner_lam)

        phi = self._map(one_task, tasks.support_x, tasks.support_y)
        return phi, self.metrics(theta, phi, tasks)

    def meta_gradient(self, theta: Params, tasks: Tasks) -> tuple[Params, dict[str, torch.Tensor]]:
        """The meta-gradient averaged over tasks, with θ's structure, and per-task metrics ``[T]``."""
        theta = tree.detach(theta)
        per_task = {"imaml": self._imaml, "maml": self._maml, "fomaml": self._fomaml,
                    "reptile": self._reptile}[self.algorithm]
        grads, phi, extra = self._map(lambda *data: per_task(theta, *data), *tasks)
        metrics = self.metrics(theta, phi, tasks)
        metrics.update(extra)
        return {k: v.mean(0) for k, v in grads.items()}, metrics

    def metrics(self, theta: Params, phi: Params, tasks: Tasks) -> dict[str, torch.Tensor]:
        """Loss (and accuracy) on support and query sets before (θ) and after (φ) adaptation."""
        def one_task(phi, xs, ys, xq, yq):
            out = {}
            for stage, params in (("pre", theta), ("post", phi)):
                for split, x, y in (("support", xs, ys), ("query", xq, yq)):
                    loss, accuracy = self.model.loss_and_accuracy(params, x, y)
                    out[f"{stage}_{split}_loss"] = loss
                    if accuracy is not None:
                        out[f"{stage}_{split}_accuracy"] = accuracy
            return out

        with torch.no_grad():
            return self._map(one_task, tree.detach(phi), *tasks)

    def _imaml(self, theta, xs, ys, xq, yq):
        train_loss = lambda p: self.model.loss(p, xs, ys)  # noqa: E731
        phi = self.inner(train_loss, theta, self.lam)
        query_grad = grad(lambda p: self.model.loss(p, xq, yq))(phi)

        def matvec(v):
            hv = hessian_vector_product(train_loss, phi, v, self.hvp_mode)
            return tree.add(tree.add(v, hv, 1.0 / self.lam), v, self.cg_damping)

        meta_grad, residual = conjugate_gradient(matvec, query_grad, self.cg_steps)
        relative = tree.safe_divide(residual, tree.norm(query_grad))
        return meta_grad, phi, {"cg_residual": relative}

    def _maml(self, theta, xs, ys, xq, yq):
        def query_loss_after_adaptation(theta):
            phi = self.inner(lambda p: self.model.loss(p, xs, ys), theta, 0.0)
            return self.model.loss(phi, xq, yq), phi

        meta_grad, phi = grad(query_loss_after_adaptation, has_aux=True)(theta)
        return meta_grad, tree.detach(phi), {}

    def _fomaml(self, theta, xs, ys, xq, yq):
        phi = self.inner(lambda p: self.model.loss(p, xs, ys), theta, 0.0)
        return grad(lambda p: self.model.loss(p, xq, yq))(phi), phi, {}

    def _reptile(self, theta, xs, ys, xq, yq):
        phi = self.inner(lambda p: self.model.loss(p, xs, ys), theta, 0.0)
        return tree.add(theta, phi, -1.0), phi, {}

    def _map(self, fn: Callable, *per_task_args):
        """fn over the leading (task) dimension of its arguments: vmap, or a loop and a stack."""
        if self.vectorize:
            return vmap(fn)(*per_task_args)
        tasks = len(torch.utils._pytree.tree_leaves(per_task_args)[0])
        results = [fn(*torch.utils._pytree.tree_map(lambda a: a[t], per_task_args)) for t in range(tasks)]
        return torch.utils._pytree.tree_map(lambda *xs: torch.stack(xs), *results)
