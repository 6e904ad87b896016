"""Gradients and Hessian-vector products of the conv net for a whole meta-batch, written out by hand.

iMAML's inner loop needs ∇L̂(φ) per task many times over one support set, and its CG solve
needs ∇²L̂(φ)·v many times at one φ. Through ``vmap`` and autograd every one of them re-runs a
few hundred small ops with their dispatch overhead, allocates every intermediate afresh, and
recomputes what depends only on the images (or, for the products, only on φ). Here the tasks are
the batch dimension of plain tensors, and:

- the first layer's patches, their mean and covariance are computed once per support set; its
  batch norm is folded into the patch product (the output's mean and variance per channel are
  ``mean(P)·w`` and ``wᵀ cov(P) w``), so nothing of the size of its output is normalised, and its
  backward pass needs one product ``dyᵀ P`` (with a column of ones, which also gives ``Σ dy``);
- weights stay in the layout of the patch products throughout (``to_internal``), and the
  repeated passes over one support set write their large intermediates into the same memory
  each time (``prepare(..., reuse=True)``);
- ``outputs_and_hessian`` runs the forward and backward pass at φ once and keeps what the products
  need; each product is then the tangent of that computation (forward-over-reverse, written out),
  with no forward or backward pass at φ repeated — the linearisation is reused across CG steps,
  which is exact because φ does not change during the solve.

It is the same function as ``ConvNet.forward`` with the same parameters, for ReLU networks
(``FusedConvNet.supports``); tests/test_perf_paths.py checks the gradients and the products
against autograd.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from imaml_cli.models.activations import ACTIVATIONS
from imaml_cli.models.conv4 import ConvNet
from imaml_cli.models.im2col import _gather, _scatter

Params = dict[str, torch.Tensor]


class _Workspace:
    """Output tensors reused by the passes that repeat over one batch (the inner loop's gradients,
    CG's products). Freshly allocated, the widest products and patch copies ran about twice as
    slowly inside a meta-step as on their own: their memory is touched for the first time page by
    page. Not for anything a call returns or keeps; freed with the batch."""

    def __init__(self):
        self._tensors: dict[tuple, torch.Tensor] = {}

    def get(self, name: str, shape, like: torch.Tensor) -> torch.Tensor:
        key = (name, tuple(shape), like.dtype, like.device)
        tensor = self._tensors.get(key)
        if tensor is None:
            # Zeros, because a padded image relies on its border staying zero; everything else
            # is overwritten before it is read.
            tensor = self._tensors[key] = like.new_zeros(shape)
        return tensor


def _new(workspace: _Workspace | None, name: str, shape, like: torch.Tensor) -> torch.Tensor:
    return like.new_empty(shape) if workspace is None else workspace.get(name, shape, like)


def _buffers(workspace: _Workspace | None, prefix: str, like: torch.Tensor):
    if workspace is None:
        return None
    return lambda name, shape: workspace.get(f"{prefix}.{name}", shape, like)


@dataclass
class Batch:
    """What the network needs of a batch of images (and targets), computed once."""

    # [T, K + 1, M]: the first layer's patches and a row of ones, transposed: so stored, the first
    # layer's weight gradient (a narrow [K + 1, C] result) is a product several times faster than
    # dyᵀ P with the patches in rows, and the forward product reads it as fast either way.
    patches_t: torch.Tensor
    mean: torch.Tensor  # [T, K]: the patches' mean
    covariance: torch.Tensor  # [T, K, K]: their covariance (normalised by M)
    targets: torch.Tensor | None  # [T, N, outputs]: one-hot classes, or regression targets
    images: int  # N
    size: tuple[int, int]  # the first layer's output height and width
    workspace: _Workspace | None  # scratch memory for repeated passes over this batch, if any


class FusedConvNet:
    """Per-task losses, gradients and Hessian-vector products of a ReLU ``ConvNet``, for
    parameters batched over tasks (``[T, ...]``, in the layout of ``to_internal``).

    A batch prepared with ``reuse=True`` carries scratch memory, so serves one thread at a time.
    """

    def __init__(self, network: ConvNet, kind: str):
        if not self.supports(network, kind):
            raise ValueError("FusedConvNet needs a ConvNet with ReLU activations and square kernels")
        self.kind = kind
        self.blocks = []
        for i, block in enumerate(network.features):
            conv = block.conv
            self.blocks.append({
                "weight": f"features.{i}.conv.weight", "gamma": f"features.{i}.norm.weight",
                "beta": f"features.{i}.norm.bias", "stride": conv.stride[0], "pool": block.pool,
                "eps": block.norm.eps, "kernel": conv.kernel_size[0], "padding": conv.padding[0],
                "in": conv.in_channels})
        self.channels = network.features[-1].conv.out_channels
        self.num_outputs = network.head.out_features
        self.final_size = math.isqrt(network.head.in_features // self.channels)

    @staticmethod
    def supports(network, kind: str) -> bool:
        return (isinstance(network, ConvNet) and kind in ("classification", "regression")
                and all(block.activation is ACTIVATIONS["relu"]
                        and block.conv.kernel_size[0] == block.conv.kernel_size[1]
                        and block.conv.stride[0] == block.conv.stride[1]
                        and block.conv.padding[0] == block.conv.padding[1] for block in network.features))

    def to_internal(self, params: Params) -> Params:
        """Conv kernels as ``[..., C_out, kh·kw·C_in]`` and the head's columns in (H, W, C) order.

        A permutation of the entries: dot products, and so CG, are the same in either layout.
        """
        out = dict(params)
        for b in self.blocks:
            w = params[b["weight"]]
            out[b["weight"]] = w.movedim(-3, -1).reshape(*w.shape[:-3], -1)
        w = params["head.weight"]
        s = self.final_size
        out["head.weight"] = w.reshape(*w.shape[:-1], self.channels, s, s).movedim(-3, -1).reshape(w.shape)
        return out

    def from_internal(self, params: Params) -> Params:
        out = dict(params)
        for b in self.blocks:
            w = params[b["weight"]]
            k = b["kernel"]
            out[b["weight"]] = w.reshape(*w.shape[:-1], k, k, b["in"]).movedim(-1, -3).contiguous()
        w = params["head.weight"]
        s = self.final_size
        out["head.weight"] = (w.reshape(*w.shape[:-1], s, s, self.channels).movedim(-1, -3)
                              .reshape(w.shape).contiguous())
        return out

    def prepare(self, x: torch.Tensor, y: torch.Tensor | None = None, reuse: bool = False) -> Batch:
        """``x`` ``[T, N, C, H, W]``; ``y`` ``[T, N]`` classes or ``[T, N, outputs]`` targets, or
        None when only ``outputs`` is wanted. ``reuse``: keep scratch memory for the many passes
        that will follow over this batch (it lives as long as the batch)."""
        first = self.blocks[0]
        patches = _gather(x.movedim(2, -1), first["kernel"], first["stride"], first["padding"])
        t, n, ho, wo, k = patches.shape
        patches = patches.reshape(t, n * ho * wo, k)
        mean = patches.mean(1)
        centered = patches - mean.unsqueeze(1)
        covariance = torch.bmm(centered.transpose(1, 2), centered).div_(centered.shape[1])
        if y is None:
            targets = None
        elif self.kind == "classification":
            targets = F.one_hot(y, self.num_outputs).to(x.dtype)
        else:
            targets = y.to(x.dtype)
        patches_t = torch.cat([patches.transpose(1, 2), patches.new_ones(t, 1, n * ho * wo)], 1)
        return Batch(patches_t, mean, covariance, targets, n, (ho, wo), _Workspace() if reuse else None)

    def outputs(self, params: Params, batch: Batch) -> torch.Tensor:
        """The network's outputs ``[T, N, outputs]``."""
        return self._forward(params, batch, batch.workspace)[0]

    def outputs_and_gradient(self, params: Params, batch: Batch) -> tuple[torch.Tensor, Params]:
        """The outputs ``[T, N, outputs]`` and the per-task loss gradients."""
        logits, cache = self._forward(params, batch, batch.workspace)
        d_logits = self._loss_derivative(logits, batch, cache)
        return logits, self._backward(params, batch, d_logits, cache, keep=False, workspace=batch.workspace)

    def outputs_and_hessian(self, params: Params, batch: Batch) -> tuple[torch.Tensor, Callable[[Params], Params]]:
        """The outputs, and v ↦ ∇²L(params)·v per task for many v: the passes at ``params`` run
        once, here."""
        logits, _, hessian = self.outputs_gradient_and_hessian(params, batch)
        return logits, hessian

    def outputs_gradient_and_hessian(self, params: Params, batch: Batch, curvature: str = "hessian") -> tuple[
            torch.Tensor, Params, Callable[[Params], Params]]:
        """``outputs_and_hessian`` and the per-task loss gradients, which its backward pass yields.

        ``curvature="gauss_newton"`` gives v ↦ Jᵀ ∇²ℓ J v instead (J the Jacobian of the outputs,
        ∇²ℓ the loss' Hessian in the outputs): the Hessian without the network's second-order terms,
        positive semi-definite for the cross-entropy and squared losses.

        The gradients share memory with what the products read: do not update them in place."""
        logits, cache = self._forward(params, batch)
        d_logits = self._loss_derivative(logits, batch, cache)
        grads = self._backward(params, batch, d_logits, cache, keep=True)
        # The ReLU masks serve every product. As 0/1 floats, since multiplying in place by a float
        # mask is 1.5x faster than threshold_backward and 5x faster than by a bool mask on CPU.
        for layer in cache["layers"]:
            layer["mask"] = (layer["out"] > 0).to(layer["out"].dtype)
        if curvature == "gauss_newton":
            return logits, grads, lambda vector: self._gauss_newton_product(params, batch, cache, vector, batch.workspace)
        return logits, grads, lambda vector: self._hessian_vector_product(params, batch, cache, vector, batch.workspace)

    def _loss_derivative(self, logits, batch: Batch, cache) -> torch.Tensor:
        """∂L/∂outputs of the mean cross-entropy or squared error per task."""
        if self.kind == "classification":
            probs = torch.softmax(logits, -1)
            cache["probs"] = probs
            return (probs - batch.targets).div_(batch.images)
        diff = logits - batch.targets
        return diff.mul_(2.0 / diff[0].numel())

    def _forward(self, params: Params, batch: Batch, workspace: _Workspace | None = None):
        t, n = batch.patches_t.shape[0], batch.images
        layers = []
        first = self.blocks[0]
        w1 = params[first["weight"]]
        cov_w = torch.bmm(w1, batch.covariance)  # cov(P) w per output channel
        rstd = torch.rsqrt((cov_w * w1).sum(-1) + first["eps"])
        scale = params[first["gamma"]] * rstd
        mean_w = (w1 * batch.mean.unsqueeze(1)).sum(-1)
        folded = torch.cat([w1 * scale.unsqueeze(-1), (params[first["beta"]] - mean_w * scale).unsqueeze(-1)], -1)
        out = torch.bmm(batch.patches_t.transpose(1, 2), folded.transpose(1, 2),
                        out=_new(workspace, "out0", (t, batch.patches_t.shape[2], w1.shape[1]), w1)).relu_()
        layer = {"out": out.view(t, n, *batch.size, -1), "cov_w": cov_w, "rstd": rstd, "scale": scale,
                 "mean_w": mean_w}
        layers.append(layer)
        a = self._pool(first, layer)

        for i, b in enumerate(self.blocks[1:], 1):
            patches = _gather(a, b["kernel"], b["stride"], b["padding"], _buffers(workspace, f"gather{i}", a))
            size = patches.shape[2:4]
            patches = patches.view(t, -1, patches.shape[-1])
            w = params[b["weight"]]
            h = torch.bmm(patches, w.transpose(1, 2), out=_new(workspace, f"h{i}", (t, patches.shape[1], w.shape[1]), w))
            h.sub_(h.mean(1, keepdim=True))
            rstd = torch.rsqrt(h.square().mean(1, keepdim=True) + b["eps"])
            xhat = h.mul_(rstd)
            out = torch.addcmul(params[b["beta"]].unsqueeze(1), xhat, params[b["gamma"]].unsqueeze(1),
                                out=_new(workspace, f"out{i}", h.shape, h)).relu_()
            layer = {"out": out.view(t, n, *size, -1), "patches": patches, "xhat": xhat, "rstd": rstd,
                     "in_shape": a.shape}
            layers.append(layer)
            a = self._pool(b, layer)

        features = a.reshape(t, n, -1)
        logits = torch.baddbmm(params["head.bias"].unsqueeze(1), features, params["head.weight"].transpose(1, 2))
        return logits, {"layers": layers, "features": features}

    def _backward(self, params: Params, batch: Batch, d_logits, cache, keep: bool,
                  workspace: _Workspace | None = None) -> Params:
        """The gradient; with ``keep``, also what the Hessian-vector products need, into ``cache``."""
        grads: Params = {}
        t = d_logits.shape[0]
        layers = cache["layers"]
        grads["head.weight"] = torch.bmm(d_logits.transpose(1, 2), cache["features"])
        grads["head.bias"] = d_logits.sum(1)
        d_a = torch.bmm(d_logits, params["head.weight"])
        if keep:
            cache["d_logits"] = d_logits

        for i in range(len(self.blocks) - 1, 0, -1):
            b, layer = self.blocks[i], layers[i]
            d_out = self._unpool(b, d_a, layer)
            patches, xhat, out = layer["patches"], layer["xhat"], layer["out"]
            m = patches.shape[1]
            dy = torch.ops.aten.threshold_backward.grad_input(
                d_out.reshape(t, m, -1), out.view(t, m, -1), 0, grad_input=_new(workspace, f"dy{i}", xhat.shape, xhat))
            d_beta = dy.sum(1)
            d_gamma = (dy * xhat).sum(1)
            grads[b["beta"]], grads[b["gamma"]] = d_beta, d_gamma
            # dh = γ r (dy − Σdy/M − x̂ Σ(dy x̂)/M); q is the bracket.
            q = torch.addcmul(dy, xhat, d_gamma.unsqueeze(1), value=-1.0 / m).sub_(d_beta.unsqueeze(1) / m)
            dh = q * (params[b["gamma"]].unsqueeze(1) * layer["rstd"])
            grads[b["weight"]] = torch.bmm(dh.transpose(1, 2), patches)
            d_patches = torch.bmm(dh, params[b["weight"]], out=_new(workspace, f"dpatches{i}", patches.shape, patches))
            in_shape = layer["in_shape"]
            d_a = _scatter(d_patches.view(*out.shape[:4], -1), in_shape[2], in_shape[3], b["kernel"], b["stride"],
                           b["padding"], _new(workspace, f"dinput{i}", in_shape, patches))
            if keep:
                layer.update(dy=dy, q=q, dh=dh, d_gamma=d_gamma)

        first, layer = self.blocks[0], layers[0]
        d_out = self._unpool(first, d_a, layer)
        out = layer["out"]
        m = batch.patches_t.shape[2]
        dy = torch.ops.aten.threshold_backward.grad_input(d_out.reshape(t, m, -1), out.view(t, m, -1), 0,
                                                          grad_input=_new(workspace, "dy0", (t, m, out.shape[-1]), out))
        g_aug = torch.bmm(batch.patches_t, dy).transpose(1, 2)  # dyᵀ P and, last, Σ dy
        g, d_beta = g_aug[..., :-1], g_aug[..., -1]
        w1, rstd, cov_w = params[first["weight"]], layer["rstd"], layer["cov_w"]
        d_gamma = rstd * ((g * w1).sum(-1) - d_beta * layer["mean_w"])
        grads[first["beta"]], grads[first["gamma"]] = d_beta, d_gamma
        grads[first["weight"]] = layer["scale"].unsqueeze(-1) * (
            g - d_beta.unsqueeze(-1) * batch.mean.unsqueeze(1) - (d_gamma * rstd).unsqueeze(-1) * cov_w)
        if keep:
            layer.update(g=g, d_beta=d_beta, d_gamma=d_gamma)
        return {k: grads[k] for k in params}

    def _gauss_newton_product(self, params: Params, batch: Batch, cache, v: Params,
                              workspace: _Workspace | None = None) -> Params:
        """Jᵀ ∇²ℓ J v: the outputs' tangent along ``v``, times the loss' Hessian, pulled back by
        the plain backward pass at ``params``."""
        _, t_d_logits = self._outputs_tangent(params, batch, cache, v, workspace)
        return self._backward(params, batch, t_d_logits, cache, keep=False, workspace=workspace)

    def _outputs_tangent(self, params: Params, batch: Batch, cache, v: Params,
                         workspace: _Workspace | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The forward tangent along ``v`` (kept in ``cache`` for the Hessian's backward): the
        features' tangent and ∇²ℓ times the outputs' tangent."""
        t = batch.patches_t.shape[0]
        layers = cache["layers"]

        # Forward. First layer: y = γ r (P − mean)·w + β with r = (wᵀΣw + ε)^(-1/2), linear in P.
        first, layer = self.blocks[0], layers[0]
        w1, rstd, scale = params[first["weight"]], layer["rstd"], layer["scale"]
        t_w1, t_gamma = v[first["weight"]], v[first["gamma"]]
        t_rstd = -rstd.pow(3) * (layer["cov_w"] * t_w1).sum(-1)
        t_scale = t_gamma * rstd + params[first["gamma"]] * t_rstd
        u = t_scale.unsqueeze(-1) * w1 + scale.unsqueeze(-1) * t_w1
        shift = v[first["beta"]] - (u * batch.mean.unsqueeze(1)).sum(-1)
        out = layer["out"]
        t_out = torch.bmm(batch.patches_t.transpose(1, 2), torch.cat([u, shift.unsqueeze(-1)], -1).transpose(1, 2),
                          out=_new(workspace, "t_out0", (t, batch.patches_t.shape[2], out.shape[-1]), out))
        t_out = t_out.view(out.shape).mul_(layer["mask"])
        layer.update(t_rstd=t_rstd, t_scale=t_scale)
        t_a = self._pool_tangent(first, t_out, layer)

        for i, b in enumerate(self.blocks[1:], 1):
            layer = layers[i]
            patches, xhat, rstd, out = layer["patches"], layer["xhat"], layer["rstd"], layer["out"]
            m = patches.shape[1]
            t_patches = _gather(t_a, b["kernel"], b["stride"], b["padding"],
                                _buffers(workspace, f"t_gather{i}", t_a)).view(patches.shape)
            t_h = torch.bmm(t_patches, params[b["weight"]].transpose(1, 2), out=_new(workspace, f"t_h{i}", xhat.shape, xhat))
            t_h.baddbmm_(patches, v[b["weight"]].transpose(1, 2))
            t_h.sub_(t_h.mean(1, keepdim=True))
            # x̂ = c r: t_x̂ = r (t_c − x̂ mean(x̂ t_c)), and t_r = −r² mean(x̂ t_c).
            k = (xhat * t_h).mean(1, keepdim=True)
            t_xhat = t_h.sub_(xhat * k).mul_(rstd)
            t_y = torch.addcmul(v[b["beta"]].unsqueeze(1), xhat, v[b["gamma"]].unsqueeze(1),
                                out=_new(workspace, f"t_y{i}", xhat.shape, xhat))
            t_y.addcmul_(t_xhat, params[b["gamma"]].unsqueeze(1))
            t_out = t_y.view(out.shape).mul_(layer["mask"])
            layer.update(t_patches=t_patches, t_xhat=t_xhat, t_rstd=-rstd.square() * k)
            t_a = self._pool_tangent(b, t_out, layer)

        # The loss' derivative with respect to the outputs, and its tangent.
        t_features = t_a.reshape(cache["features"].shape)
        features = cache["features"]
        t_logits = torch.baddbmm(v["head.bias"].unsqueeze(1), t_features, params["head.weight"].transpose(1, 2))
        t_logits.baddbmm_(features, v["head.weight"].transpose(1, 2))
        if self.kind == "classification":
            probs = cache["probs"]
            t_d_logits = probs * t_logits
            t_d_logits.sub_(probs * t_d_logits.sum(-1, keepdim=True)).div_(batch.images)
        else:
            t_d_logits = t_logits.mul_(2.0 / t_logits[0].numel())
        return t_features, t_d_logits

    def _hessian_vector_product(self, params: Params, batch: Batch, cache, v: Params,
                                workspace: _Workspace | None = None) -> Params:
        """The tangent of ``_backward(_forward(params))`` along ``v``; a prefix t_ marks tangents."""
        t_features, t_d_logits = self._outputs_tangent(params, batch, cache, v, workspace)
        t = batch.patches_t.shape[0]
        layers = cache["layers"]
        features = cache["features"]
        first = self.blocks[0]
        w1, t_w1 = params[first["weight"]], v[first["weight"]]
        hv: Params = {}

        # Backward.
        d_logits = cache["d_logits"]
        hv["head.weight"] = torch.bmm(t_d_logits.transpose(1, 2), features).baddbmm_(
            d_logits.transpose(1, 2), t_features)
        hv["head.bias"] = t_d_logits.sum(1)
        t_d_a = torch.bmm(t_d_logits, params["head.weight"]).baddbmm_(d_logits, v["head.weight"])

        for i in range(len(self.blocks) - 1, 0, -1):
            b, layer = self.blocks[i], layers[i]
            patches, xhat, out, rstd = layer["patches"], layer["xhat"], layer["out"], layer["rstd"]
            t_patches, t_xhat = layer["t_patches"], layer["t_xhat"]
            m = patches.shape[1]
            gamma = params[b["gamma"]].unsqueeze(1)
            t_dy = self._unpool(b, t_d_a, layer).view(out.shape).mul_(layer["mask"]).view(t, m, -1)
            t_d_beta = t_dy.sum(1)
            t_d_gamma = (t_dy * xhat).sum(1).add_((layer["dy"] * t_xhat).sum(1))
            hv[b["beta"]], hv[b["gamma"]] = t_d_beta, t_d_gamma
            # dh = γ r q with q = dy − Σdy/M − x̂ dγ/M.
            t_q = torch.addcmul(t_dy, t_xhat, layer["d_gamma"].unsqueeze(1), value=-1.0 / m)
            t_q.addcmul_(xhat, t_d_gamma.unsqueeze(1), value=-1.0 / m).sub_(t_d_beta.unsqueeze(1) / m)
            t_dh = t_q.mul_(gamma * rstd).addcmul_(
                layer["q"], v[b["gamma"]].unsqueeze(1) * rstd + gamma * layer["t_rstd"])
            dh = layer["dh"]
            hv[b["weight"]] = torch.bmm(t_dh.transpose(1, 2), patches).baddbmm_(dh.transpose(1, 2), t_patches)
            t_d_patches = torch.bmm(t_dh, params[b["weight"]], out=_new(workspace, f"t_dpatches{i}", patches.shape,
                                                                        patches)).baddbmm_(dh, v[b["weight"]])
            in_shape = layer["in_shape"]
            t_d_a = _scatter(t_d_patches.view(*out.shape[:4], -1), in_shape[2], in_shape[3], b["kernel"], b["stride"],
                             b["padding"], _new(workspace, f"t_dinput{i}", in_shape, patches))

        first, layer = self.blocks[0], layers[0]
        out = layer["out"]
        m = batch.patches_t.shape[2]
        t_dy = self._unpool(first, t_d_a, layer).view(out.shape).mul_(layer["mask"]).view(t, m, -1)
        t_g_aug = torch.bmm(batch.patches_t, t_dy).transpose(1, 2)
        t_g, t_d_beta = t_g_aug[..., :-1], t_g_aug[..., -1]
        g, d_beta, d_gamma = layer["g"], layer["d_beta"], layer["d_gamma"]
        rstd, t_rstd, cov_w, mean_w = layer["rstd"], layer["t_rstd"], layer["cov_w"], layer["mean_w"]
        t_mean_w = (t_w1 * batch.mean.unsqueeze(1)).sum(-1)
        # dγ = r (g·w − Σdy mean·w); dw = s (g − Σdy mean − dγ r Σw), s = γ r.
        t_d_gamma = (t_rstd * ((g * w1).sum(-1) - d_beta * mean_w)
                     + rstd * ((t_g * w1).sum(-1) + (g * t_w1).sum(-1) - t_d_beta * mean_w - d_beta * t_mean_w))
        hv[first["beta"]], hv[first["gamma"]] = t_d_beta, t_d_gamma
        mean = batch.mean.unsqueeze(1)
        bracket = g - d_beta.unsqueeze(-1) * mean - (d_gamma * rstd).unsqueeze(-1) * cov_w
        t_bracket = (t_g - t_d_beta.unsqueeze(-1) * mean
                     - (t_d_gamma * rstd + d_gamma * t_rstd).unsqueeze(-1) * cov_w
                     - (d_gamma * rstd).unsqueeze(-1) * torch.bmm(t_w1, batch.covariance))
        hv[first["weight"]] = layer["t_scale"].unsqueeze(-1) * bracket + layer["scale"].unsqueeze(-1) * t_bracket
        return {k: hv[k] for k in params}

    @staticmethod
    def _pool(block, layer) -> torch.Tensor:
        out = layer["out"]
        if not block["pool"]:
            return out
        t, n, h, w, c = out.shape
        pooled, layer["indices"] = F.max_pool2d(out.view(t * n, h, w, c).permute(0, 3, 1, 2), 2, return_indices=True)
        return pooled.permute(0, 2, 3, 1).reshape(t, n, h // 2, w // 2, c)

    @staticmethod
    def _pool_tangent(block, t_out, layer) -> torch.Tensor:
        if not block["pool"]:
            return t_out
        t, n, h, w, c = t_out.shape
        indices = layer["indices"]
        planes = t_out.view(t * n, h * w, c).transpose(1, 2)
        picked = planes.gather(2, indices.flatten(2))
        return picked.transpose(1, 2).reshape(t, n, h // 2, w // 2, c)

    @staticmethod
    def _unpool(block, d_pooled, layer) -> torch.Tensor:
        out = layer["out"]
        if not block["pool"]:
            return d_pooled
        t, n, h, w, c = out.shape
        grad_out = d_pooled.reshape(t * n, h // 2, w // 2, c).permute(0, 3, 1, 2)
        d_out = torch.ops.aten.max_pool2d_with_indices_backward(
            grad_out, out.view(t * n, h, w, c).permute(0, 3, 1, 2), [2, 2], [2, 2], [0, 0], [1, 1], False,
            layer["indices"])
        return d_out.permute(0, 2, 3, 1).reshape(t, n, h, w, c)
