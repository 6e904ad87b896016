"""Convolution patches of channels-last images, as a linear op that torch.func can transform.

Under ``vmap`` with per-task weights, ``F.conv2d`` becomes one grouped convolution over all tasks,
which runs at a fraction of the CPU's matrix throughput. Gathering the patches ("im2col") instead
turns the convolution into a batched matrix product, and the tasks into its batch dimension.

Autograd's own derivative of a patch gather (nine strided slices) allocates and sums nine
image-sized gradients per layer, which costs more than the products themselves. The pair of
functions below are each other's adjoints, so the backward of one is the other, in one pass: that
keeps gradients, forward-over-reverse and reverse-over-reverse Hessian-vector products exact and
cheap. Both act on any leading dimensions, so ``vmap`` just moves the task dimension in front.
"""

from __future__ import annotations

import torch


def im2col(x: torch.Tensor, kernel: int, stride: int, padding: int) -> torch.Tensor:
    """Patches of ``x`` ``[..., H, W, C]`` as ``[..., Ho, Wo, kernel * kernel * C]``, ordered (kh, kw, C)."""
    return _Im2col.apply(x, kernel, stride, padding)


def output_size(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


def _gather(x: torch.Tensor, kernel: int, stride: int, padding: int, buffer=None) -> torch.Tensor:
    """im2col without autograd. ``buffer(name, shape)`` may supply the padded image (whose
    border must then be zero already) and the result, for callers that reuse memory."""
    *lead, h, w, c = x.shape
    ho, wo = output_size(h, kernel, stride, padding), output_size(w, kernel, stride, padding)
    x = x.reshape(-1, h, w, c)
    # A padded copy with only its border zeroed (F.pad fills it all first), then every patch
    # read through one strided view and written out in a single copy.
    p = padding
    shape = (x.shape[0], h + 2 * p, w + 2 * p, c)
    if buffer is None:
        padded = x.new_empty(shape)
        if p:
            for border in (padded[:, :p], padded[:, h + p:], padded[:, p:h + p, :p], padded[:, p:h + p, w + p:]):
                border.zero_()
    else:
        padded = buffer("padded", shape)
    padded[:, p:h + p, p:w + p] = x
    sb, sh, sw, sc = padded.stride()
    patches = padded.as_strided((padded.shape[0], ho, wo, kernel, kernel, c),
                                (sb, stride * sh, stride * sw, sh, sw, sc))
    if buffer is None:
        return patches.reshape(*lead, ho, wo, kernel * kernel * c)
    out = buffer("patches", patches.shape)
    out.copy_(patches)
    return out.view(*lead, ho, wo, kernel * kernel * c)


def _scatter(cols: torch.Tensor, h: int, w: int, kernel: int, stride: int, padding: int,
             out: torch.Tensor | None = None) -> torch.Tensor:
    # Pixels split into stride x stride classes by the parity of their coordinates; the taps that
    # reach one class all land on it with a fixed shift. Each class is written once by its first
    # tap and accumulated by the others, instead of zero-filling the image and adding nine taps.
    *lead, ho, wo, kc = cols.shape
    c = kc // (kernel * kernel)
    cols = cols.reshape(-1, ho, wo, kernel, kernel, c)
    out = cols.new_empty(cols.shape[0], h, w, c) if out is None else out.view(cols.shape[0], h, w, c)
    for row_class in range(stride):
        rows = _taps(row_class, h, ho, kernel, stride, padding)
        for col_class in range(stride):
            columns = _taps(col_class, w, wo, kernel, stride, padding)
            region = out[:, row_class::stride, col_class::stride]
            # A tap that covers the whole class goes first and initialises it.
            taps = sorted(((i, j) for i in rows for j in columns),
                          key=lambda tap: not (rows[tap[0]][2] and columns[tap[1]][2]))
            initialised = False
            for i, j in taps:
                (r0, r1, full_rows, dr), (c0, c1, full_columns, dc) = rows[i], columns[j]
                source = cols[:, r0 + dr:r1 + dr, c0 + dc:c1 + dc, i, j]
                if not initialised and full_rows and full_columns:
                    region.copy_(source)
                else:
                    if not initialised:
                        region.zero_()
                    region[:, r0:r1, c0:c1] += source
                initialised = True
            if not initialised:
                region.zero_()
    return out.reshape(*lead, h, w, c)


def _taps(pixel_class: int, size: int, out_size: int, kernel: int, stride: int, padding: int):
    """For the pixels ``pixel_class``, ``pixel_class + stride``, ... of a dimension of ``size``: each
    tap that reaches them, as {tap: (first, end, covers all, shift)} over the class' pixels, where
    pixel ``a`` of the class receives output position ``a + shift``."""
    count = len(range(pixel_class, size, stride))
    taps = {}
    for tap in range(kernel):
        if (pixel_class + padding - tap) % stride:
            continue
        shift = (pixel_class + padding - tap) // stride
        first, end = max(0, -shift), min(count, out_size - shift)
        if first < end:
            taps[tap] = (first, end, first == 0 and end == count, shift)
    return taps


class _Im2col(torch.autograd.Function):
    @staticmethod
    def forward(x, kernel, stride, padding):
        return _gather(x, kernel, stride, padding)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, kernel, stride, padding = inputs
        ctx.geometry = (x.shape[-3], x.shape[-2], kernel, stride, padding)

    @staticmethod
    def backward(ctx, grad_cols):
        return _Col2im.apply(grad_cols, *ctx.geometry), None, None, None

    @staticmethod
    def jvp(ctx, x_tangent, *_):
        return _Im2col.apply(x_tangent, *ctx.geometry[2:])

    @staticmethod
    def vmap(info, in_dims, x, kernel, stride, padding):
        if in_dims[0] is None:
            return _Im2col.apply(x, kernel, stride, padding), None
        return _Im2col.apply(x.movedim(in_dims[0], 0), kernel, stride, padding), 0


class _Col2im(torch.autograd.Function):
    """The adjoint of ``_Im2col``: every patch entry added back onto the pixel it came from."""

    @staticmethod
    def forward(cols, h, w, kernel, stride, padding):
        return _scatter(cols, h, w, kernel, stride, padding)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.geometry = inputs[1:]

    @staticmethod
    def backward(ctx, grad_x):
        return (_Im2col.apply(grad_x, *ctx.geometry[2:]),) + (None,) * 5

    @staticmethod
    def jvp(ctx, cols_tangent, *_):
        return _Col2im.apply(cols_tangent, *ctx.geometry)

    @staticmethod
    def vmap(info, in_dims, cols, h, w, kernel, stride, padding):
        if in_dims[0] is None:
            return _Col2im.apply(cols, h, w, kernel, stride, padding), None
        return _Col2im.apply(cols.movedim(in_dims[0], 0), h, w, kernel, stride, padding), 0
