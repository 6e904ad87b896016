"""Hessian-vector products of a task's training loss."""

from typing import Callable

from torch.func import grad, jvp, vjp

from imaml_cli.meta.tree import Params

HVP_MODES = ("forward_over_reverse", "reverse_over_reverse")


def hessian_operator(loss: Callable[[Params], object], params: Params,
                     mode: str = "reverse_over_reverse") -> Callable[[Params], Params]:
    """v ↦ ∇²loss(params) · v, for many v at the same ``params`` (the steps of one CG solve).

    ``reverse_over_reverse`` builds the gradient's backward graph once and pulls every v back
    through it (the Hessian is symmetric, so the pullback is the product); each product then costs
    one second-order backward pass and no forward pass. ``forward_over_reverse`` (a jvp of the
    gradient) recomputes the gradient with every product: cheaper for a single product, dearer
    over a CG solve (see BENCHMARKS.md). Both are exact.
    """
    if mode == "forward_over_reverse":
        gradient = grad(loss)
        return lambda vector: jvp(gradient, (params,), (vector,))[1]
    if mode == "reverse_over_reverse":
        _, pullback = vjp(grad(loss), params)
        return lambda vector: pullback(vector)[0]
    raise ValueError(f"unknown HVP mode {mode!r}; expected one of {HVP_MODES}")

