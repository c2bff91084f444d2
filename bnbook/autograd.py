"""Batch norm's autograd Function: equations (1)–(4) forward, the backward of ``ch-backprop``.

:class:`BatchNormFunction` is the computational core of the twins in :mod:`bnbook.torch`: the
per-channel mean (1) and biased variance (2) of a batch, the normalisation (3) and the affine map
(4) forward, and the compact closed-form backward derived in chapter ``ch-backprop``, written
with differentiable tensor operations, so that second derivatives, ``torch.func`` transforms and
forward-mode AD (:meth:`BatchNormFunction.jvp`) work. The helpers before it choose how the same
formulas run: a block of samples at a time on the CPU in eager mode (temporaries stay in cache),
whole-tensor operations on other devices, under ``torch.compile`` and when the backward is itself
differentiated; float32 statistics for half-precision input; the input's memory format kept.

Nothing here calls torch's batch-norm functions; the modules and ``batch_norm`` that use this
Function are in :mod:`bnbook.torch`.

>>> import torch
>>> from bnbook.autograd import BatchNormFunction
>>> x = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
>>> y, mean, var = BatchNormFunction.apply(x, None, None, 1e-5)
>>> torch.autograd.gradcheck(lambda t: BatchNormFunction.apply(t, None, None, 1e-5)[0], (x,))
True
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor

__all__ = ["BatchNormFunction"]


# Half-precision inputs are normalised with float32 statistics and arithmetic, rounded once at the
# end, as torch's kernels do; every other floating dtype computes in its own precision.
_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in _LOW_PRECISION else dtype


def _cast(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t.to(dtype)``, without its dispatch (about 1 µs) when ``t`` has that dtype already: the
    eager CPU paths below would otherwise spend ~10 µs a step on no-op conversions."""
    return t if t.dtype == dtype else t.to(dtype)


def _autocast_off(device_type: str) -> contextlib.AbstractContextManager:
    """Autocast disabled for ``device_type`` while the twins compute: they choose their own dtypes.

    Under ``torch.autocast`` a matrix product (``torch.mm``, ``torch.mv`` and
    ``torch.linalg.vecdot`` sum channels on the CPU) would otherwise run in half precision and mix
    dtypes with the float32 statistics.
    """
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def _memory_format(x: Tensor) -> torch.memory_format:
    """The layout torch's batch norm gives its output: channels-last in, channels-last out."""
    if x.dim() in (4, 5) and not x.is_contiguous():
        cl = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
        if x.is_contiguous(memory_format=cl):
            return cl
    return torch.contiguous_format


def _rows_layout(x: Tensor) -> bool:
    """Whether ``x`` is best seen as (M, C) rows: one value per sample and channel (dense), or a
    channels-last layout, where a view puts each channel in a column."""
    return x.dim() == 2 or x.shape[2:].numel() == 1 or _memory_format(x) != torch.contiguous_format


def _as_ncl(x: Tensor) -> Tensor:
    """(N, C, *spatial) as a contiguous (N, C, L): a view when ``x`` is contiguous."""
    return x.contiguous().view(x.shape[0], x.shape[1], -1)


def _as_rows(x: Tensor) -> Tensor:
    """(N, C, *spatial) as (M, C), one row per position: a view for (N, C) and channels-last input."""
    if x.dim() == 2:
        return x
    return x.movedim(1, -1).reshape(-1, x.shape[1])


def _from_rows(rows: Tensor, shape: torch.Size) -> Tensor:
    """Inverse of :func:`_as_rows`: a channels-last view of shape ``shape``."""
    if len(shape) == 2:
        return rows
    return rows.view(shape[0], *shape[2:], shape[1]).movedim(-1, 1)


def _reduce_dims(x: Tensor) -> tuple[int, ...]:
    """The axes batch norm reduces over: the batch axis and every spatial one (not a generator
    expression, which ``torch.compile`` cannot trace without a graph break)."""
    return (0, *range(2, x.dim()))


def _per_channel(x: Tensor) -> tuple[int, ...]:
    """The shape that broadcasts a (C,) vector over (N, C, *spatial)."""
    return (1, -1) + (1,) * (x.dim() - 2)


def _whole_tensor(x: Tensor) -> bool:
    """Whether to take the whole-tensor path: off the CPU, under ``torch.compile``, and under a
    ``torch.func`` transform (``vmap``, ``grad``, ``jvp``, batched gradients).

    The cache-blocked CPU path writes into preallocated buffers in place and loops over blocks;
    a GPU would launch many tiny kernels for it (32–140× slower than cuDNN), the compiler would
    unroll the loop into its graph and fuses whole-tensor operations itself, and ``vmap`` cannot
    write a batched value into an unbatched buffer.
    """
    return (
        x.device.type != "cpu"
        or torch.compiler.is_compiling()
        or torch._C._are_functorch_transforms_active()
        or torch._C._functorch.is_legacy_batchedtensor(x)  # gradcheck's batched gradients
    )


# On the CPU, spatial inputs are processed a block of samples at a time, about this many elements
# per block (1 MiB of float32), so that temporaries stay in cache instead of costing a full-size
# allocation.
_BLOCK_ELEMENTS = 1 << 18


def _blocks(t: Tensor) -> list[slice]:
    """Slices over the batch axis of an (N, C, L) tensor, each about ``_BLOCK_ELEMENTS`` elements."""
    n, c, length = t.shape
    step = max(1, _BLOCK_ELEMENTS // max(1, c * length))
    return [slice(start, min(start + step, n)) for start in range(0, n, step)]


def _channel_sum(t: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """Per-channel sum of an (N, C, L) tensor, L > 1, accumulated in ``dtype`` (default t's).

    On the CPU, a matrix–vector product with a ones vector over the contiguous last axis, then a sum
    over N: several times faster than ``t.sum(dim=(0, 2))``. For a half-precision ``t`` summed in
    float32, the plain reduction (a half-precision product would overflow).
    """
    n, c, length = t.shape
    if dtype in (None, t.dtype):
        return torch.mv(t.reshape(n * c, length), t.new_ones(length)).view(n, c).sum(0)
    return t.sum(dim=(0, 2), dtype=dtype)


def _spatial_stats(x3: Tensor, out: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Per-channel first-pass mean μ₁, mean residual r and biased variance of an (N, C, L) tensor,
    in two passes; the mean is μ₁ + r (:func:`_corrected_mean`).

    Never E[x²] − E[x]²: μ₁ first, then the mean square of x − μ₁, a block at a time. The residual
    r = mean(x − μ₁), zero in exact arithmetic, measures the rounding error of μ₁; it corrects both
    the mean and σ² (the corrected two-pass algorithm of Chan, Golub and LeVeque). All three come
    in float32 for a half-precision ``x3`` (x − μ₁ is then float32 by type promotion, so no
    half-precision sum can overflow). With ``out`` (of the compute dtype), x − μ₁ is left in it.
    """
    m = x3.shape[0] * x3.shape[2]
    mean = _channel_sum(x3, _compute_dtype(x3.dtype)) / m  # (1)
    residual = torch.zeros_like(mean)
    sum_sq = torch.zeros_like(mean)
    for block in _blocks(x3):
        centered = torch.sub(x3[block], mean[:, None], out=None if out is None else out[block])
        residual += _channel_sum(centered)
        sum_sq += torch.linalg.vecdot(centered, centered).sum(0)
    var = ((sum_sq - residual * residual / m) / m).clamp_(min=0)  # (2), biased
    return mean, residual / m, var


def _centered_affine(
    out: Tensor,
    x3: Tensor,
    mean: Tensor,
    scale: Tensor,
    shift: Tensor | None = None,
    dy3: Tensor | None = None,
    k: Tensor | None = None,
    centered: bool = False,
) -> None:
    """out = (x − μ)·scale + shift [+ k·dy], per channel, a block at a time (all (N, C, L)).

    In place in ``out`` when it has the compute dtype; for a half-precision ``out`` each block is
    computed in float32 and rounded once. With ``centered``, ``out`` (of the compute dtype) holds
    x − μ already, written while it was reduced, and only the affine part runs.
    """
    for block in _blocks(x3):
        target = out[block]
        direct = target.dtype == mean.dtype
        if centered:
            t = target
        else:
            t = torch.sub(x3[block], mean[:, None], out=target if direct else None)
        t.mul_(scale[:, None])
        if shift is not None:
            t.add_(shift[:, None])
        if dy3 is not None:
            t.addcmul_(dy3[block].to(mean.dtype), k[:, None])
        if not direct:
            target.copy_(t)


def _column_sums(t2: Tensor, scale: float = 1.0, blas_from: int = 1 << 20) -> Tensor:
    """Per-channel sums of an (M, C) tensor, times ``scale`` (1/M for means).

    Below ``blas_from`` elements (2²⁰: cache-resident) torch's reduction ``t2.sum(0)``; from there,
    a (1, M) row of ``scale`` times the table, a matrix product: BLAS walks the rows in memory
    order, 2.6× faster than ``t2.sum(0)`` at (4096, 1024) (and 27× faster than a float64
    ``t2.mean(0)``), one thread. A matrix product, not ``torch.mv``: ``torch.compile`` keeps a
    matrix product as a BLAS call but lowers a matrix–vector product, like ``t2.sum(0)``, to a
    loop of its own that walks down all M rows for each strip of columns, a stride of 4C bytes per
    step (about 5× slower than BLAS at (4096, 1024)).
    """
    if t2.numel() >= blas_from:
        return torch.mm(t2.new_full((1, t2.shape[0]), scale), t2).view(-1)
    sums = t2.sum(0)
    return sums if scale == 1.0 else sums * scale


def _corrected_mean(mean: Tensor, residual_mean: Tensor) -> Tensor:
    """μ plus the mean residual mean(x − μ). Where μ is not finite the residual is NaN and is left
    out, so an infinite μ stays infinite (as in torch)."""
    return mean + residual_mean.nan_to_num(0.0, 0.0, 0.0)


def _rows_stats(xc: Tensor) -> tuple[Tensor, Tensor, Tensor | None, Tensor]:
    """μ, x − μ, the mean residual r = mean(x − μ) (None when not needed) and σ² (biased) of (M, C)
    rows, two passes.

    A small tensor (below 2¹⁶ elements) takes μ accumulated in float64: exact to float32
    rounding, so x − μ needs no correction, in the fewest operations (at (60, 100) each costs about
    2 µs whatever its size). A larger one takes BLAS sums (:func:`_column_sums`) in its own dtype,
    and the residual r corrects both: μ + r, σ² = mean((x − μ)²) − r².
    """
    if xc.numel() < 1 << 16:
        mean = xc.mean(0, dtype=torch.float64).to(xc.dtype)  # (1)
        centered = xc - mean
        return mean, centered, None, (centered * centered).mean(0)  # (2)
    inv_m = 1.0 / xc.shape[0]
    mean = _column_sums(xc, inv_m)  # (1), with the rounding error of a float32 sum
    centered = xc - mean
    residual = _column_sums(centered, inv_m)  # zero in exact arithmetic
    var = torch.addcmul(_column_sums(centered * centered, inv_m), residual, residual, value=-1)
    return _corrected_mean(mean, residual), centered, residual, var.clamp_(min=0)  # (2)


def _rows_forward(x2: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float):
    """Equations (1)–(4) on (M, C) rows (dense and channels-last) in few whole-tensor operations.

    The residual r of :func:`_rows_stats` folds into the affine map:
    y = (x − μ − r)·a + β = (x − μ)·a + (β − r·a), one ``addcmul`` in place in our copy x − μ.
    """
    xc = _cast(x2, _compute_dtype(x2.dtype))
    mean, centered, residual, var = _rows_stats(xc)
    scale = torch.rsqrt(var + eps)
    if weight is not None:
        scale = scale * weight
    if residual is not None:
        bias = -residual * scale if bias is None else bias - residual * scale
    if bias is None:
        y2 = centered.mul_(scale)
    else:
        y2 = torch.addcmul(bias, centered, scale, out=centered)  # (3), (4)
    return _cast(y2, x2.dtype), mean, var


def _blocked_forward(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float):
    """The CPU's eager forward: y (dtype and layout of ``x``), μ and σ² (compute dtype)."""
    if _rows_layout(x):
        y2, mean, var = _rows_forward(_as_rows(x), weight, bias, eps)
        return _from_rows(y2, x.shape), mean, var
    x3 = _as_ncl(x)
    y3 = torch.empty_like(x3)
    direct = y3.dtype == _compute_dtype(x3.dtype)  # y can hold x − μ₁ (not for half precision)
    mean, residual, var = _spatial_stats(x3, out=y3 if direct else None)
    # (3) and (4): y = (x − μ)·a + β, a = γ/σ per channel; x − μ first keeps float32 accurate
    scale = torch.rsqrt(var + eps)
    if weight is not None:
        scale = scale * weight
    corrected = _corrected_mean(mean, residual)
    if direct:
        # y holds x − μ₁ already: y = (x − μ₁)·a + (β − r·a), the residual folded into the shift
        shift = residual.nan_to_num(0.0, 0.0, 0.0) * -scale
        if bias is not None:
            shift += bias
        _centered_affine(y3, x3, mean, scale, shift, centered=True)
    else:
        _centered_affine(y3, x3, corrected, scale, bias)
    return y3.view(x.shape), corrected, var


def _sum_over(t: Tensor, dims: tuple[int, ...], scale: float = 1.0) -> Tensor:
    """Per-channel sums of ``t`` over ``dims``, times ``scale``, for the whole-tensor path.

    On the CPU a dense (M, C) table is summed by :func:`_column_sums`, in eager mode
    (``create_graph``, ``torch.func``) and under ``torch.compile``: BLAS for a table beyond the
    cache, which the compiled code calls as it is; below that the compiler fuses the reduction
    with the operations that produce its argument, which a BLAS call would need written out in
    full first (1.3× slower at (1024, 256)).
    """
    if t.dim() == 2 and t.device.type == "cpu":
        return _column_sums(t, scale)
    sums = t.sum(dims)
    return sums if scale == 1.0 else sums * scale


def _whole_forward(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float):
    """Equations (1)–(4) as whole-tensor operations: y, μ, σ² (biased)."""
    dims, view = _reduce_dims(x), _per_channel(x)
    xc = x.to(_compute_dtype(x.dtype))
    inv_m = 1.0 / (xc.numel() // xc.shape[1])
    mean = _sum_over(xc, dims, inv_m)  # (1)
    centered = xc - mean.view(view)
    var = _sum_over(centered * centered, dims, inv_m)  # (2), biased
    scale = torch.rsqrt(var + eps)
    if weight is not None:
        scale = scale * weight
    y = centered * scale.view(view)  # (3), (4)
    if bias is not None:
        y = y + bias.view(view)
    return y.to(x.dtype), mean, var


def _whole_backward(x, weight, mean, var, eps, dy, dmean, dvar, needs, bias_dtype):
    """The hand-derived backward (chapter ``ch-backprop``) written with differentiable operations.

    Used when the backward itself is differentiated (``create_graph=True``: Hessians, gradient
    penalties) and under ``torch.func``: autograd then differentiates this formula, and its
    dependence on μ and σ², saved outputs of :class:`BatchNormFunction`, flows back through the
    Function's own backward, the ``dmean``/``dvar`` terms below.
    """
    need_dx, need_dw, need_db = needs
    dims, view = _reduce_dims(x), _per_channel(x)
    m = x.numel() // x.shape[1]
    cdt = mean.dtype
    invstd = torch.rsqrt(var + eps)
    centered = x.to(cdt) - mean.view(view)
    dx = dw = db = None
    if dy is not None:
        g = dy.to(cdt)
        x_hat = centered * invstd.view(view)
        sum_dy = _sum_over(g, dims)
        sum_dy_xhat = _sum_over(g * x_hat, dims)
        if need_dx:
            k = invstd if weight is None else invstd * weight
            # dx = γ/(m σ) (m dy − Σ dy − x̂ Σ dy x̂)
            dx = k.view(view) * (g - (sum_dy / m).view(view) - x_hat * (sum_dy_xhat / m).view(view))
        if need_dw and weight is not None:
            dw = sum_dy_xhat.to(weight.dtype)
        if need_db and bias_dtype is not None:
            db = sum_dy.to(bias_dtype)
    if need_dx and dmean is not None:  # ∂μ/∂x = 1/m
        dx = (
            (dmean / m).view(view).expand_as(centered)
            if dx is None
            else dx + (dmean / m).view(view)
        )
    if need_dx and dvar is not None:  # ∂σ²/∂x = 2 (x − μ)/m
        term = centered * (2.0 * dvar / m).view(view)
        dx = term if dx is None else dx + term
    if dx is not None:
        dx = dx.to(x.dtype)
    return dx, dw, db


def _blocked_backward(x, weight, mean, var, eps, dy, needs, bias_dtype):
    """The CPU's eager backward: the same formula, a block at a time, into preallocated buffers."""
    need_dx, need_dw, need_db = needs
    invstd = torch.rsqrt(var + eps)
    k = invstd if weight is None else weight * invstd
    dx = None
    if _rows_layout(x):
        # dense or channels-last: (M, C) rows, BLAS sums, and dx as two addcmuls into one buffer:
        # dx = k·dy − k Σdy/m − (k Σdy x̂/m)·x̂
        x2, dy2 = _as_rows(x), _cast(_as_rows(dy), mean.dtype)
        x_hat = (x2 - mean).mul_(invstd)
        sum_dy = _column_sums(dy2)
        product = dy2 * x_hat
        sum_dy_xhat = _column_sums(product)
        if need_dx:
            minus_k_over_m = k * (-1.0 / dy2.shape[0])
            dx = torch.addcmul(minus_k_over_m * sum_dy, dy2, k, out=product)
            dx = dx.addcmul_(x_hat, minus_k_over_m.mul_(sum_dy_xhat))
            dx = _from_rows(_cast(dx, x.dtype), x.shape)
    else:
        x3, dy3 = _as_ncl(x), _as_ncl(dy)
        m = dy3.shape[0] * dy3.shape[2]
        sum_dy = _channel_sum(dy3, mean.dtype)
        sum_dy_xc = torch.zeros_like(mean)
        # x − μ is written into dx's buffer while Σ dy·(x − μ) is taken (it is needed again below)
        keep = need_dx and x3.dtype == mean.dtype
        dx = torch.empty_like(x3) if need_dx else None
        for block in _blocks(x3):
            centered = torch.sub(x3[block], mean[:, None], out=dx[block] if keep else None)
            sum_dy_xc += torch.linalg.vecdot(dy3[block].to(mean.dtype), centered).sum(0)
        sum_dy_xhat = sum_dy_xc * invstd
        if need_dx:
            # dx = k·dy + j·(x − μ) + h, per channel j = −k σ⁻¹ Σdy x̂ / m, h = −k Σdy / m
            j = -k * invstd * sum_dy_xhat / m
            h = -k * sum_dy / m
            _centered_affine(dx, x3, mean, j, h, dy3, k, centered=keep)
            dx = dx.view(x.shape)
    dw = _cast(sum_dy_xhat, weight.dtype) if (need_dw and weight is not None) else None
    db = _cast(sum_dy, bias_dtype) if (need_db and bias_dtype is not None) else None
    return dx, dw, db


class BatchNormFunction(torch.autograd.Function):
    """Batch norm with batch statistics, forward and hand-derived backward.

    ``y, mean, var = BatchNormFunction.apply(x, weight, bias, eps)`` with ``x`` of shape
    (N, C, *spatial), N·prod(spatial) > 0, ``weight``/``bias`` of shape (C,) or None; ``mean``
    and ``var`` (biased) are per-channel outputs in their own right (as ``torch.native_batch_norm``
    returns its saved statistics): differentiable, and used for the running-statistics update.

    Backward (chapter ``ch-backprop``), with σ = sqrt(σ²_B + ε) and m values per channel::

        dx = γ/(m σ) (m dy − Σ dy − x̂ Σ dy x̂) + dμ/m + 2 dσ² (x − μ)/m,
        dγ = Σ dy x̂,   dβ = Σ dy

    On the CPU in eager mode both directions run a block of samples at a time into preallocated
    buffers (a dense or channels-last input as (M, C) rows). When the backward is itself being
    differentiated (``create_graph=True``), and under ``torch.compile`` or a ``torch.func``
    transform, the same formula runs as whole-tensor differentiable operations, so second
    derivatives are exact: autograd differentiates the hand-derived formula, never the forward.
    Forward-mode AD has its own rule (:meth:`jvp`); ``vmap`` rules are generated from these
    staticmethods (``generate_vmap_rule``).

    ``y`` and ``dx`` keep the dtype and memory format of ``x``; a float16 or bfloat16 ``x`` is
    normalised with float32 statistics and arithmetic (``mean`` and ``var`` are float32), as in
    torch. Autocast is off inside: the function chooses its own dtypes.
    """

    generate_vmap_rule = True

    @classmethod
    def apply(cls, *args, **kwargs):
        """``Function.apply``, without its per-call ``inspect.signature`` binding in eager mode.

        ``torch.autograd.Function.apply`` binds the arguments to ``forward``'s signature on every
        call of a Function that has ``setup_context`` (to fill in defaults): about 20 µs, a third of
        torch's whole forward and backward at (60, 100). ``forward`` has no defaults, so four
        positional arguments need no binding; anything else, and every transform or compile, goes
        through torch's own ``apply``.
        """
        if (
            kwargs
            or len(args) != 4
            or torch._C._are_functorch_transforms_active()
            or torch.compiler.is_compiling()
        ):
            return super().apply(*args, **kwargs)
        return super(torch.autograd.Function, cls).apply(*args)

    @staticmethod
    def forward(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float):
        with _autocast_off(x.device.type):
            if _whole_tensor(x):
                return _whole_forward(x, weight, bias, eps)
            return _blocked_forward(x, weight, bias, eps)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        x, weight, bias, eps = inputs
        _, mean, var = output
        ctx.eps = eps
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x, weight, mean, var)
        ctx.save_for_forward(x, weight, mean, var)

    @staticmethod
    def backward(ctx, dy: Tensor | None, dmean: Tensor | None, dvar: Tensor | None):
        x, weight, mean, var = ctx.saved_tensors
        needs = ctx.needs_input_grad[:3]
        with _autocast_off(x.device.type):
            if (
                dy is None
                or dmean is not None
                or dvar is not None
                or torch.is_grad_enabled()
                or _whole_tensor(dy)
            ):
                dx, dw, db = _whole_backward(
                    x, weight, mean, var, ctx.eps, dy, dmean, dvar, needs, ctx.bias_dtype
                )
            else:
                dx, dw, db = _blocked_backward(
                    x, weight, mean, var, ctx.eps, dy, needs, ctx.bias_dtype
                )
        return dx, dw, db, None

    @staticmethod
    def jvp(ctx, dx: Tensor | None, dw: Tensor | None, db: Tensor | None, _deps):
        """Forward-mode derivative: the tangents of y, μ and σ² given those of x, γ and β."""
        x, weight, mean, var = ctx.saved_tensors
        dims, view = _reduce_dims(x), _per_channel(x)
        cdt = mean.dtype
        invstd = torch.rsqrt(var + ctx.eps)
        centered = x.to(cdt) - mean.view(view)
        x_hat = centered * invstd.view(view)
        dy = torch.zeros_like(x_hat)
        dmean, dvar = torch.zeros_like(mean), torch.zeros_like(var)
        if dx is not None:
            t = dx.to(cdt)
            dmean = t.mean(dims)
            t_centered = t - dmean.view(view)
            dvar = 2.0 * (centered * t_centered).mean(dims)
            # x̂' = (x' − μ')/σ − (x − μ) σ'/σ², σ' = σ²'/(2σ)
            dx_hat = (t_centered - x_hat * (0.5 * dvar * invstd).view(view)) * invstd.view(view)
            dy = dx_hat if weight is None else dx_hat * weight.view(view)
        if dw is not None:
            dy = dy + x_hat * dw.view(view)
        if db is not None:
            dy = dy + db.view(view)
        return dy.to(x.dtype), dmean, dvar


class _BatchNormFunctionCompiled(BatchNormFunction):
    """:class:`BatchNormFunction` for ``torch.compile``: the same forward and backward, without the
    forward-mode rule (dynamo refuses to trace a Function that defines ``jvp``; forward-mode AD
    does not go through the compiler anyway)."""

    jvp = torch.autograd.Function.jvp


def _batch_norm_function():
    """The Function to apply: the compile-friendly one while ``torch.compile`` traces."""
    return _BatchNormFunctionCompiled if torch.compiler.is_compiling() else BatchNormFunction
