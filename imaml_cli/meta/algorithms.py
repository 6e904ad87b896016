"""Meta-learning algorithms behind one interface: θ and a batch of tasks in, meta-gradient out.

Every algorithm is written for one task and mapped over the tasks of a meta-batch with ``vmap``
(or, for reference and benchmarks, a plain Python loop over the same per-task function). For the
ReLU conv nets, the inner loop (gradient descent or Newton-CG) and everything after it can instead
run through the hand-written batched passes of ``models/fused.py`` (``MetaLearner.fused``): the same
meta-gradient, about twice as fast on CPU (BENCHMARKS.md).

- ``imaml``: adapt φ by the inner solver on L̂(φ) + λ/2‖φ − θ‖², then solve
  (I + ∇²L̂(φ)/λ) g = ∇L_test(φ) by CG with Hessian-vector products (Rajeswaran et al. 2019).
  Nothing is differentiated through the inner loop.
- ``maml``: differentiate L_test(φ(θ)) through the inner GD steps (Finn et al. 2017).
- ``fomaml``: ∇L_test(φ), MAML's first-order approximation.
- ``reptile``: θ − φ, the Reptile update as a gradient for the outer optimizer (Nichol et al. 2018).
  Reptile has no train/test split within a task, and its meta-learning signal comes from inner
  steps on different minibatches (its paper's analysis: the inner products of gradients of
  different minibatches); so during meta-training its inner steps take the support and the query
  set in turn (``alternate_query``). Every step on the same batch leaves joint training plus a
  gradient-norm penalty, which does not learn to adapt.
"""

from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch
from torch.func import grad, vmap

from imaml_cli.data.episodes import TaskBatch
from imaml_cli.meta import tree
from imaml_cli.meta.cg import SOLVERS, conjugate_gradient, neumann_series
from imaml_cli.meta.hvp import HVP_MODES, hessian_operator
from imaml_cli.meta.inner import CURVATURES, GradientDescent, InnerSolver, NewtonCG
from imaml_cli.meta.precision import check_precision, matmul_precision
from imaml_cli.meta.task_groups import group_count, run_groups
from imaml_cli.meta.task import TaskModel
from imaml_cli.meta.tree import Params

ALGORITHMS = ("imaml", "maml", "fomaml", "reptile")


@dataclass(frozen=True)
class MetaLearner:
    """One algorithm with its settings. ``lam``, ``cg_steps`` and ``cg_damping`` matter to iMAML only.

    ``cg_damping`` adds δ·I to the CG matrix, I + ∇²L̂/λ + δI; it is 0 (the paper's system) unless
    set. The theory assumes φ minimises the inner problem, where that matrix is positive
    semi-definite; after a few GD steps on a ReLU + batch-norm net it often is not (on Omniglot,
    eigenvalues down to about −3 at the paper's settings), and plain CG then takes huge steps along
    directions of near-zero or negative curvature. ``cg_stop_at_negative_curvature`` (default)
    ends CG at the first direction with pᵀAp ≤ 0 and keeps the iterate so far (∇L_test itself if it
    is the first): the same answer as plain CG whenever the matrix is positive definite.
    ``cg_trust_radius`` (needs ``cg_damping`` δ > 0) ends CG on the sphere ‖x‖ = ‖∇L_test‖/δ: where φ
    minimises the inner problem, I + ∇²L̂/λ ⪰ 0, so the damped matrix is ⪰ δI and the solution lies
    inside; a near-singular system elsewhere cannot then give one task a meta-gradient many times its
    query gradient. ``vectorize=False`` processes the tasks in a Python loop, as a reference for the batched path.
    ``alternate_query`` matters to Reptile only: its meta-training inner steps alternate between the
    support and the query set (False: all on the support set). Adaptation alone (``adapt``, as in
    evaluation) uses the support set only, for every algorithm.
    ``cg_solver="neumann"`` replaces CG by the truncated Neumann series with step size
    ``neumann_step_size`` and ``cg_steps`` terms (``meta/cg.py``); the negative-curvature stop is CG's only.
    ``cg_curvature="gauss_newton"`` solves with the Gauss-Newton part of ∇²L̂ (Jᵀ∇²ℓJ, positive
    semi-definite) in place of the Hessian, on the fused passes only: always a well-posed system,
    at the price of dropping the network's second-order terms from the meta-gradient where φ is
    not a minimiser (at a minimiser of a well-fitted support set those terms vanish with the residuals).

    Speed switches, measured in BENCHMARKS.md. The first two compute the same meta-gradient up to
    rounding; the defaults are the fastest exact choices.

    - ``hvp_mode``: how CG's Hessian-vector products are taken by autograd (``hessian_operator``).
    - ``fused``: for a network ``TaskModel.fused`` covers (the ReLU conv nets), take the inner
      loop's gradients (and Newton-CG's Hessian-vector products and line-search passes), the query
      gradients, iMAML's Hessian-vector products and the metrics' forward passes for all tasks at
      once by the hand-written passes of ``models/fused.py`` instead of ``vmap`` over autograd
      (``hvp_mode`` and Newton-CG's ``hvp_mode`` then do not apply). Needs ``vectorize``; not for
      MAML's meta-gradient, which differentiates through the inner loop.
    - ``precision``: the internal precision of float32 matrix products during a meta-step
      (``meta/precision.py``): ``ieee``, ``bf16`` (CPU) or ``tf32`` (CUDA). Not ``ieee`` changes
      the result: on Omniglot the meta-gradient after 16 inner steps moves far more than bf16's
      rounding (BENCHMARKS.md), so ``ieee`` is the default.
    - ``task_groups``: split a batch of tasks into up to this many groups that run on concurrent
      threads (``meta/task_groups.py``); the same result up to rounding.
    """

    model: TaskModel
    algorithm: str
    inner: InnerSolver
    lam: float = 1.0
    alternate_query: bool = True
    cg_steps: int = 5
    cg_damping: float = 0.0
    cg_stop_at_negative_curvature: bool = True
    cg_trust_radius: bool = False
    cg_solver: str = "cg"
    cg_curvature: str = "hessian"
    neumann_step_size: float = 0.1
    hvp_mode: str = "reverse_over_reverse"
    vectorize: bool = True
    fused: bool = True
    precision: str = "ieee"
    task_groups: int = 1

    def __post_init__(self):
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"unknown algorithm {self.algorithm!r}; expected one of {ALGORITHMS}")
        if self.algorithm != "imaml" and not isinstance(self.inner, GradientDescent):
            raise ValueError(f"algorithm {self.algorithm!r} adapts by gradient descent; use the gd inner solver")
        if self.algorithm == "imaml" and not self.lam > 0:
            raise ValueError(f"iMAML needs lam > 0, got {self.lam}")
        if self.cg_solver not in SOLVERS:
            raise ValueError(f"unknown solver {self.cg_solver!r}; expected one of {SOLVERS}")
        trust_radius_posed = self.cg_damping > 0 and self.cg_solver == "cg"
        if self.algorithm == "imaml" and self.cg_trust_radius and not trust_radius_posed:
            raise ValueError("the CG trust radius ‖∇L_test‖/δ needs cg_damping δ > 0 and cg_solver 'cg'")
        if self.hvp_mode not in HVP_MODES:
            raise ValueError(f"unknown HVP mode {self.hvp_mode!r}; expected one of {HVP_MODES}")
        check_precision(self.precision)
        if self.task_groups < 1:
            raise ValueError(f"task_groups must be >= 1, got {self.task_groups}")
        if self.cg_curvature not in CURVATURES:
            raise ValueError(f"unknown CG curvature {self.cg_curvature!r}; expected one of {CURVATURES}")
        outer_gauss_newton = self.cg_curvature != "hessian" and self.algorithm == "imaml"
        if (getattr(self.inner, "batched_only", False) or outer_gauss_newton) and self._fused_model() is None:
            raise ValueError("Gauss-Newton curvature (inner solver or CG) and Levenberg-Marquardt damping run on the "
                             "fused passes only: a built-in ReLU conv net with fused and vectorize on")
        autograd_modes = set()
        if self._fused_model() is None:
            autograd_modes.add(getattr(self.inner, "hvp_mode", None))
            if self.algorithm == "imaml":
                autograd_modes.add(self.hvp_mode)
        if ("reverse_over_reverse" in autograd_modes and self.vectorize
                and getattr(self.model.network, "conv_impl", None) == "native"):
            # F.batch_norm's double backward reads .data, which vmap forbids.
            raise ValueError("hvp_mode 'reverse_over_reverse' needs conv_impl 'im2col' under vmap; "
                             "use hvp_mode 'forward_over_reverse' with the native convolution")

    @property
    def inner_lam(self) -> float:
        """The proximal weight of the inner problem: iMAML's λ, none for the others."""
        return self.lam if self.algorithm == "imaml" else 0.0

    def adapt(self, theta: Params, tasks: TaskBatch) -> tuple[Params, dict[str, torch.Tensor]]:
        """Adapted parameters per task ``[T, ...]`` and per-task metrics, without a meta-gradient."""
        theta = tree.detach(theta)

        def adapt_group(group: TaskBatch):
            phi, report = self._adapt(theta, [(group.support_x, group.support_y)])
            return phi, {**self.metrics(theta, phi, group), **report}

        return self._in_groups(adapt_group, theta, tasks, self._fused_model() is not None)

    def meta_gradient(self, theta: Params, tasks: TaskBatch) -> tuple[Params, dict[str, torch.Tensor]]:
        """The meta-gradient averaged over tasks, with θ's structure, and per-task metrics ``[T]``."""
        theta = tree.detach(theta)
        fused = self._fused_model() is not None and self.algorithm != "maml"
        grads, metrics = self._in_groups(lambda group: self._per_task_meta_gradients(theta, group), theta, tasks,
                                         fused)
        return {k: v.mean(0) for k, v in grads.items()}, metrics

    def _in_groups(self, fn: Callable, theta: Params, tasks: TaskBatch, fused: bool):
        """``fn`` (a batch of tasks ↦ per-task results) on the groups of ``tasks``, its results
        joined along the task dimension. Only ``fused`` work runs in groups: vmap's transforms
        are not safe on concurrent threads. The precision is set here, once for all the threads."""
        groups = group_count(len(tasks.support_x), self.task_groups) if fused else 1
        with self._precision(theta):
            parts = run_groups(fn, tasks, groups)
        if len(parts) == 1:
            return parts[0]
        return torch.utils._pytree.tree_map(lambda *xs: torch.cat(xs), *parts)

    def _per_task_meta_gradients(self, theta: Params, tasks: TaskBatch):
        """The meta-gradient of each task ``[T, ...]`` and the per-task metrics."""
        fused = self._fused_model()
        if self.algorithm == "maml":
            grads, phi, extra = self._map(lambda *data: self._maml(theta, *data), *tasks)
        elif fused is not None:
            return self._fused_meta_gradient(fused, theta, tasks)
        else:
            phi, extra = self._adapt(theta, self._inner_loop_data((tasks.support_x, tasks.support_y),
                                                                  (tasks.query_x, tasks.query_y)))
            grads, outer = self._outer_gradients(theta, phi, tasks)
            extra.update(outer)
        metrics = self.metrics(theta, phi, tasks)
        metrics.update(extra)
        return grads, metrics

    def metrics(self, theta: Params, phi: Params, tasks: TaskBatch) -> dict[str, torch.Tensor]:
        """Loss (and accuracy) on support and query sets before (θ) and after (φ) adaptation."""
        fused = self._fused_model()
        with torch.no_grad():
            if fused is not None:
                # The support targets serve the gradient at φ that inner_grad_norm needs.
                return self._fused_metrics(fused, fused.to_internal(theta), fused.to_internal(tree.detach(phi)),
                                           fused.prepare(tasks.support_x, tasks.support_y), fused.prepare(tasks.query_x),
                                           tasks, {})

            def one_task(phi, xs, ys, xq, yq):
                out = {}
                for stage, params in (("pre", theta), ("post", phi)):
                    for split, x, y in (("support", xs, ys), ("query", xq, yq)):
                        loss, accuracy = self.model.loss_and_accuracy(params, x, y)
                        out[f"{stage}_{split}_loss"] = loss
                        if accuracy is not None:
                            out[f"{stage}_{split}_accuracy"] = accuracy
                if self.algorithm == "imaml":
                    out["inner_grad_norm"] = self._inner_grad_norm(grad(self.model.loss)(phi, xs, ys), phi, theta, 0)
                return out

            return self._map(one_task, tree.detach(phi), *tasks)

    def _fused_metrics(self, fused, theta, phi, support, query, tasks: TaskBatch, known: dict):
        """``metrics`` from the outputs of the fused network; ``known`` holds outputs (named
        stage_split) and the support-loss gradients at φ (post_support_gradient) that the meta-step
        already computed."""
        params = {"pre": {k: v.expand(len(tasks.support_x), *v.shape) for k, v in theta.items()}, "post": phi}
        metrics = {}
        if self.algorithm == "imaml":
            if "post_support_gradient" not in known:
                known["post_support"], known["post_support_gradient"] = fused.outputs_and_gradient(phi, support)
            metrics["inner_grad_norm"] = self._inner_grad_norm(known["post_support_gradient"], phi, params["pre"], 1)
        # Batched rather than vmapped: the fused path runs in task groups on concurrent threads,
        # which vmap does not allow.
        for stage in ("pre", "post"):
            for split, batch, y in (("support", support, tasks.support_y), ("query", query, tasks.query_y)):
                name = f"{stage}_{split}"
                out = known[name] if name in known else fused.outputs(params[stage], batch)
                metrics[f"{name}_loss"] = self.model.batched_loss_of_outputs(out, y)
                if self.model.kind == "classification":
                    metrics[f"{name}_accuracy"] = self.model.accuracy_of_outputs(out, y)
        return metrics

    def _inner_grad_norm(self, support_grad: Params, phi: Params, theta: Params, batch_dims: int) -> torch.Tensor:
        """‖∇L̂(φ) + λ(φ − θ)‖: 0 at the minimiser of the inner problem, where the implicit gradient is exact."""
        return tree.norm(tree.add(support_grad, tree.add(phi, theta, -1.0), self.lam), batch_dims)

    def top_hessian_eigenvalue(self, theta: Params, tasks: TaskBatch, iterations: int) -> torch.Tensor:
        """Per task, the Rayleigh quotient after ``iterations`` steps of power iteration (from the
        all-ones vector) on the support loss' Hessian at the adapted φ: its eigenvalue of largest
        magnitude, how sharp the inner problem is where the meta-gradient is taken. Gradient descent
        at step size lr is stable on the proximal objective only below about 2/lr − λ."""
        theta = tree.detach(theta)
        phi, _ = self.adapt(theta, tasks)
        fused = self._fused_model()
        with self._precision(theta), torch.no_grad():
            if fused is not None:
                support = fused.prepare(tasks.support_x, tasks.support_y, reuse=True)
                phi = fused.to_internal(phi)
                _, hessian = fused.outputs_and_hessian(phi, support)
                return _power_iteration(hessian, phi, iterations, batch_dims=1)

            def one_task(phi, xs, ys):
                hessian = hessian_operator(lambda p: self.model.loss(p, xs, ys), phi, "forward_over_reverse")
                return _power_iteration(hessian, phi, iterations, batch_dims=0)

            return self._map(one_task, tree.detach(phi), tasks.support_x, tasks.support_y)

    def _precision(self, theta: Params):
        return matmul_precision(self.precision, next(iter(theta.values())).device)

    def _fused_model(self):
        """The hand-written batched gradient, when the settings allow it, else None."""
        if self.fused and self.vectorize:
            return self.model.fused
        return None

    @property
    def _alternates(self) -> bool:
        return self.algorithm == "reptile" and self.alternate_query

    def _inner_loop_data(self, support: tuple, query: tuple) -> list[tuple]:
        """The ``(x, y)`` batches that meta-training's inner steps take in turn, the support set first
        (raw tensors or the fused network's prepared batches alike)."""
        return [support, query] if self._alternates else [support]

    def _adapt(self, theta: Params, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[Params, dict]:
        """φ per task ``[T, ...]``: the inner solver on each task's proximal loss, its steps on
        ``batches`` in turn (the support set first); and what the solver reports per task
        (``inner_halvings`` or ``inner_step``)."""
        fused = self._fused_model()
        if fused is not None:
            prepared = [(fused.prepare(x, y, reuse=True), y) for x, y in batches]
            report = {}
            phi = self._fused_adapt(fused, fused.to_internal(theta), prepared, {}, report)
            return fused.from_internal(phi), report

        def one_task(*data):
            losses = [partial(self.model.loss, x=x, y=y) for x, y in zip(data[::2], data[1::2])]
            report = {}
            phi = self.inner(losses[0] if len(losses) == 1 else losses, theta, self.inner_lam, report=report)
            return phi, report

        return self._map(one_task, *(t for batch in batches for t in batch))

    def _fused_adapt(self, fused, theta: Params, batches: list, known: dict, report: dict) -> Params:
        """φ per task, in ``fused``'s layout, by the inner solver's batched form, its steps on the
        prepared ``(batch, y)`` pairs in turn; the outputs at θ on the first (the support set) go
        into ``known`` as pre_support, the solver's per-task report into ``report``."""
        support, support_y = batches[0]
        if isinstance(self.inner, NewtonCG):
            def linearise(params):
                outputs, grads, hessian = fused.outputs_gradient_and_hessian(params, support, self.inner.curvature)
                known.setdefault("pre_support", outputs)
                return grads, self.model.batched_loss_of_outputs(outputs, support_y), hessian

            def loss(params):
                return self.model.batched_loss_of_outputs(fused.outputs(params, support), support_y)

            return self.inner.batched(linearise, loss, theta, self.inner_lam, len(support_y), report)

        def gradient_on(batch, targets, first: bool):
            def gradient(params):
                grads, loss, outputs = self._fused_gradient_and_loss(fused, params, batch, targets)
                if first:
                    known.setdefault("pre_support", outputs)
                return grads, loss

            return gradient

        gradients = [gradient_on(batch, targets, i == 0) for i, (batch, targets) in enumerate(batches)]
        return self.inner.batched(gradients, theta, self.inner_lam, len(support_y), report)

    def _fused_gradient_and_loss(self, fused, params: Params, batch, targets: torch.Tensor):
        """The batched support-loss gradients and the losses ``[T]`` (what ``GradientDescent.batched``
        takes; None where it does not need them), and the outputs."""
        outputs, grads = fused.outputs_and_gradient(params, batch)
        # Only the backtracking inner loop looks at the losses.
        loss = self.model.batched_loss_of_outputs(outputs, targets) if self.inner.backtrack else None
        return grads, loss, outputs

    def _outer_gradients(self, theta: Params, phi: Params, tasks: TaskBatch):
        """Per-task meta-gradients ``[T, ...]`` of the first-order algorithms and iMAML, given φ."""
        if self.algorithm == "reptile":
            return tree.add({k: v.expand_as(phi[k]) for k, v in theta.items()}, phi, -1.0), {}
        query_grad = self._map(grad(self.model.loss), phi, tasks.query_x, tasks.query_y)
        if self.algorithm == "fomaml":
            return query_grad, {}
        return self._map(self._implicit_gradient, phi, query_grad, tasks.support_x, tasks.support_y)

    def _implicit_gradient(self, phi, query_grad, xs, ys):
        hessian = hessian_operator(lambda p: self.model.loss(p, xs, ys), phi, self.hvp_mode)
        return self._solve(hessian, query_grad, batch_dims=0)

    def _solve(self, hessian, query_grad: Params, batch_dims: int):
        """(I + ∇²L̂(φ)/λ + δI)⁻¹ ∇L_test(φ) by ``cg_solver``, its relative residual and its steps taken."""
        def matvec(v):
            return tree.add(v if self.cg_damping == 0 else tree.scale(v, 1.0 + self.cg_damping),
                            hessian(v), 1.0 / self.lam)

        query_norm = tree.norm(query_grad, batch_dims)
        if self.cg_solver == "neumann":
            solved = neumann_series(matvec, query_grad, self.cg_steps, self.neumann_step_size, batch_dims)
        else:
            radius = query_norm / self.cg_damping if self.cg_trust_radius else None
            solved = conjugate_gradient(matvec, query_grad, self.cg_steps, self.cg_stop_at_negative_curvature,
                                        radius, batch_dims)
        meta_grad = solved.solution
        extra = {"cg_residual": tree.safe_divide(solved.residual_norm, query_norm), "cg_steps": solved.steps_taken}
        dtype = solved.residual_norm.dtype
        if self.cg_solver == "cg" and self.cg_stop_at_negative_curvature:
            # The matrix is not the positive definite one the theory assumes at a minimiser.
            extra["cg_negative_curvature"] = ((solved.steps_taken < self.cg_steps) & ~solved.on_boundary).to(dtype)
        if self.cg_trust_radius:
            # Nor is it when the solution would leave the sphere: I + ∇²L̂/λ has an eigenvalue below 0.
            extra["cg_radius_stop"] = solved.on_boundary.to(dtype)
        return meta_grad, extra

    def _fused_meta_gradient(self, fused, theta: Params, tasks: TaskBatch):
        """The per-task meta-gradients and the metrics, all tasks at once through ``fused``."""
        support = fused.prepare(tasks.support_x, tasks.support_y, reuse=True)
        theta_i = fused.to_internal(theta)
        # Scratch memory for the query's many passes only where the inner steps take it.
        query = fused.prepare(tasks.query_x, tasks.query_y, reuse=self._alternates)
        known, extra = {}, {}
        phi = self._fused_adapt(fused, theta_i, self._inner_loop_data((support, tasks.support_y),
                                                                      (query, tasks.query_y)), known, extra)
        if self.algorithm == "reptile":
            grads = tree.add({k: v.expand_as(phi[k]) for k, v in theta_i.items()}, phi, -1.0)
        else:
            known["post_query"], grads = fused.outputs_and_gradient(phi, query)
            if self.algorithm == "imaml":
                known["post_support"], known["post_support_gradient"], hessian = fused.outputs_gradient_and_hessian(
                    phi, support, self.cg_curvature)
                grads, outer = self._solve(hessian, grads, batch_dims=1)
                extra.update(outer)
        metrics = self._fused_metrics(fused, theta_i, phi, support, query, tasks, known)
        metrics.update(extra)
        return fused.from_internal(grads), metrics

    def _maml(self, theta, xs, ys, xq, yq):
        def query_loss_after_adaptation(theta):
            phi = self.inner(lambda p: self.model.loss(p, xs, ys), theta, 0.0)
            return self.model.loss(phi, xq, yq), phi

        meta_grad, phi = grad(query_loss_after_adaptation, has_aux=True)(theta)
        return meta_grad, tree.detach(phi), {}

    def _map(self, fn: Callable, *per_task_args):
        """fn over the leading (task) dimension of its arguments: vmap, or a loop and a stack."""
        if self.vectorize:
            return vmap(fn)(*per_task_args)
        tasks = len(torch.utils._pytree.tree_leaves(per_task_args)[0])
        results = [fn(*torch.utils._pytree.tree_map(lambda a: a[t], per_task_args)) for t in range(tasks)]
        return torch.utils._pytree.tree_map(lambda *xs: torch.stack(xs), *results)


def _power_iteration(matvec: Callable[[Params], Params], like: Params, iterations: int, batch_dims: int) -> torch.Tensor:
    """The Rayleigh quotient vᵀAv of the unit v after ``iterations`` power steps from all ones."""
    v = {k: torch.ones_like(x) for k, x in like.items()}
    rayleigh = torch.zeros(())
    for _ in range(iterations):
        v = tree.add(tree.zeros_like(v), v, 1.0 / tree.norm(v, batch_dims))
        product = matvec(v)
        rayleigh = tree.dot(v, product, batch_dims)
        v = product
    return rayleigh
