"""Batch norm when the batch is the problem: ghost batch norm, batch renormalisation, Batch Layer
Normalisation and a sketch of Full Normalisation (chapters ``ch-challenges`` and ``ch-family``).

Every layer here is a :class:`bnbook.torch._NormBase`: the constructor's first arguments are
``torch.nn.BatchNorm*d``'s, parameters and buffers carry its names (a state dict loads into
``torch.nn.BatchNorm*d``), the momentum rule and the running-statistics update are the base's, and
so are the input checks and the exceptions they raise. Each layer changes only how training-mode
statistics are computed (``_forward_batch``); every extra argument is keyword-only.

* **Ghost batch norm** :cite:p:`hoffer2017train` normalises each group of ``ghost_batch_size``
  consecutive samples with the group's own statistics: it decouples the batch of the gradient step
  from the batch of the statistics, which is how ``ch-challenges`` simulates small batches per
  device at a fixed optimisation batch.
* **Batch renormalisation** :cite:p:`ioffe2017renorm` normalises with the batch (or group)
  statistics and then corrects towards the running ones with per-channel factors that the backward
  pass treats as constants,

  .. math::

      \\hat x = \\frac{x - \\mu_B}{\\sigma_B}\\, r + d, \\qquad
      r = \\operatorname{clip}_{[1/r_{\\max},\\, r_{\\max}]}\\Big(\\frac{\\sigma_B}{\\sigma}\\Big), \\qquad
      d = \\operatorname{clip}_{[-d_{\\max},\\, d_{\\max}]}\\Big(\\frac{\\mu_B - \\mu}{\\sigma}\\Big),

  with :math:`\\sigma_B = \\sqrt{\\sigma_B^2 + \\epsilon}` and
  :math:`\\sigma = \\sqrt{\\sigma^2_{\\text{run}} + \\epsilon}` (label ``eq-challenges-renorm``). The
  clipping limits follow one schedule, :func:`renorm_limits`. With ``r_max = 1, d_max = 0`` the layer
  is ghost batch norm (and batch norm without groups).
* **Batch Layer Normalisation** (:class:`BatchLayerNorm`) mixes batch- and layer-normalised values.
* **Full Normalisation**, sketched (:class:`FullNormSketch`): normalise with running estimates that
  each batch refines.

Evaluation is the base's affine map with the running statistics for every layer but
:class:`BatchLayerNorm`, whose layer-normalised share depends on the sample.

>>> import torch
>>> from bnbook.small_batch import GhostBatchNorm1d, BatchRenorm1d
>>> ghost = GhostBatchNorm1d(4, ghost_batch_size=8)
>>> ghost(torch.randn(32, 4)).shape   # four groups of 8, each normalised on its own
torch.Size([32, 4])
>>> renorm = BatchRenorm1d(4, r_max=3.0, d_max=5.0)
>>> renorm(torch.randn(32, 4, 10)).shape
torch.Size([32, 4, 10])
"""

from __future__ import annotations

import inspect
import math

import torch
from torch import Tensor

from bnbook._checks import check_positive_int, check_training_size
from bnbook.torch import _memory_format, _NormBase

__all__ = [
    "renorm_limits",
    "GhostBatchNorm1d",
    "GhostBatchNorm2d",
    "BatchRenorm1d",
    "BatchRenorm2d",
    "BatchLayerNorm",
    "FullNormSketch",
]


def renorm_limits(
    step: int,
    *,
    r_max: float = 3.0,
    d_max: float = 5.0,
    warmup_steps: int = 0,
    r_ramp_steps: int = 0,
    d_ramp_steps: int = 0,
) -> tuple[float, float]:
    """The clipping limits (r_max(t), d_max(t)) of batch renormalisation at training step ``step``.

    Ioffe (2017) trains "with batchnorm alone" first (r clipped to [1, 1], d to [0, 0]) and then
    relaxes the limits gradually. Here: (1, 0) for ``step < warmup_steps``, then a linear ramp that
    reaches ``r_max`` after ``r_ramp_steps`` more steps and ``d_max`` after ``d_ramp_steps`` (the
    paper says "gradually"; linear is this book's choice). Zero ramp steps: the final limit at once.

    Raises
    ------
    ValueError
        ``r_max < 1``, ``d_max < 0``, or a negative step count.

    >>> [renorm_limits(t, warmup_steps=10, r_ramp_steps=20, d_ramp_steps=10) for t in (0, 10, 20, 30)]
    [(1.0, 0.0), (1.0, 0.0), (2.0, 5.0), (3.0, 5.0)]
    """
    if not r_max >= 1.0:
        raise ValueError(f"r_max must be >= 1 (r is clipped to [1/r_max, r_max]), got {r_max!r}")
    if not d_max >= 0.0:
        raise ValueError(f"d_max must be >= 0 (d is clipped to [-d_max, d_max]), got {d_max!r}")
    for name, value in (("warmup_steps", warmup_steps), ("r_ramp_steps", r_ramp_steps)):
        check_positive_int(name, value, minimum=0)
    check_positive_int("d_ramp_steps", d_ramp_steps, minimum=0)
    if step < warmup_steps:
        return 1.0, 0.0
    t = step - warmup_steps
    r_frac = 1.0 if r_ramp_steps == 0 else min(1.0, t / r_ramp_steps)
    d_frac = 1.0 if d_ramp_steps == 0 else min(1.0, t / d_ramp_steps)
    return 1.0 + (r_max - 1.0) * r_frac, d_max * d_frac


#: The schedule's keywords and their defaults, as :func:`renorm_limits` declares them.
_SCHEDULE = {
    name: p.default
    for name, p in inspect.signature(renorm_limits).parameters.items()
    if p.kind is p.KEYWORD_ONLY
}


# --------------------------------------------------------------------------------------------
# One computation: normalise groups of samples, optionally renormalised
# --------------------------------------------------------------------------------------------


def _per_channel(t: Tensor, ndim: int) -> Tensor:
    return t.reshape((1, -1) + (1,) * (ndim - 2))


def _affine(x_hat: Tensor, weight: Tensor | None, bias: Tensor | None) -> Tensor:
    y = x_hat
    if weight is not None:
        y = y * _per_channel(weight, x_hat.dim())
    if bias is not None:
        y = y + _per_channel(bias, x_hat.dim())
    return y


def _standardise(t: Tensor, dims: tuple[int, ...], eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """x̂, mean and biased variance of ``t`` over ``dims`` (kept), in two passes; differentiable."""
    mean = t.mean(dim=dims, keepdim=True)
    centered = t - mean
    var = (centered * centered).mean(dim=dims, keepdim=True)
    return centered * torch.rsqrt(var + eps), mean, var


def _groups(x3: Tensor, ghost_batch_size: int | None) -> list[Tensor]:
    """(N, C, L) as blocks (G, g, C, L) of consecutive samples: the full groups, then the rest."""
    n, c, length = x3.shape
    g = n if ghost_batch_size is None else min(ghost_batch_size, n)
    full, rest = divmod(n, g)
    blocks = [x3[: full * g].reshape(full, g, c, length)]
    if rest:
        blocks.append(x3[full * g :].reshape(1, rest, c, length))
    return blocks


def _normalise_groups(
    input: Tensor,
    ghost_batch_size: int | None,
    eps: float,
    running: tuple[Tensor, Tensor] | None = None,
    limits: tuple[float, float] = (1.0, 0.0),
    record: dict[str, Tensor] | None = None,
) -> tuple[Tensor, Tensor, Tensor, int]:
    """x̂ of (N, C, *) ``input``, each group of samples with its own statistics, renormalised
    towards ``running`` = (mean, unbiased variance) within ``limits`` = (r_max, d_max) if given.

    Returns x̂ (shape of ``input``) and, for the running estimates, the size-weighted average of the
    groups' means, a variance whose unbiased form (× m/(m − 1)) is the average of the groups'
    unbiased variances, and m, the values per channel (0 for an empty batch). ``record``, if given,
    receives the factors ``r`` and ``d``, shape (C,) or (groups, C).
    """
    n, c = input.shape[:2]
    length = math.prod(input.shape[2:])
    if n == 0:  # nothing to normalise; nothing to learn from
        zeros = input.new_zeros(c)
        return input.clone(), zeros, zeros, 0
    pieces, mean_sum, var_sum, factors = [], input.new_zeros(c), input.new_zeros(c), []
    for block in _groups(input.reshape(n, c, length), ghost_batch_size):
        count = block.shape[1] * length
        check_training_size((block.shape[1], c, length))
        x_hat, mean, var = _standardise(block, (1, 3), eps)
        if running is not None and limits != (1.0, 0.0):
            with torch.no_grad():  # r and d are constants of the backward pass ("stop_gradient")
                std_run = torch.sqrt(running[1] + eps)[:, None]  # (C, 1)
                r = (torch.sqrt(var + eps) / std_run).clamp(1.0 / limits[0], limits[0])
                d = ((mean - running[0][:, None]) / std_run).clamp(-limits[1], limits[1])
            x_hat = x_hat * r + d
            factors.append((r.reshape(-1, c), d.reshape(-1, c)))
        with torch.no_grad():
            mean_sum += mean.reshape(-1, c).sum(0) * block.shape[1]
            var_sum += var.reshape(-1, c).sum(0) * (count / (count - 1) * block.shape[1])
        pieces.append(x_hat.reshape(-1, c, length))
    x_hat = (torch.cat(pieces) if len(pieces) > 1 else pieces[0]).reshape(input.shape)
    x_hat = x_hat.contiguous(memory_format=_memory_format(input))  # channels-last stays so
    if record is not None and factors:
        record["r"], record["d"] = (torch.cat(f).squeeze(0) for f in zip(*factors, strict=True))
    m = n * length
    return x_hat, mean_sum / n, var_sum / n * ((m - 1) / m), m


# --------------------------------------------------------------------------------------------
# The layers
# --------------------------------------------------------------------------------------------


class _BatchRenorm(_NormBase):
    """Batch renormalisation with ghost groups; closed clips make it ghost batch norm."""

    _input_dims = (2, 3)
    _shape_hint = "(N, C) or (N, C, L)"

    def __init__(
        self, num_features: int, *args, ghost_batch_size: int | None = None, **kwargs
    ) -> None:
        # args and kwargs: torch's (eps, momentum, affine, track_running_stats, device, dtype) and
        # the schedule's keywords, which default to renorm_limits's
        schedule = {name: kwargs.pop(name, default) for name, default in _SCHEDULE.items()}
        renorm_limits(0, **schedule)  # validates
        if ghost_batch_size is not None:
            check_positive_int("ghost_batch_size", ghost_batch_size)
        super().__init__(num_features, *args, **kwargs)
        for name, value in schedule.items():
            setattr(self, name, float(value) if name in ("r_max", "d_max") else value)
        self.ghost_batch_size = ghost_batch_size
        self._factors: dict[str, Tensor] = {}

    @property
    def last_r(self) -> Tensor | None:
        """The factor r of the last training step, (C,) (or (groups, C)); None before any."""
        return self._factors.get("r")

    @property
    def last_d(self) -> Tensor | None:
        """The shift d of the last training step, shaped like :attr:`last_r`."""
        return self._factors.get("d")

    @property
    def schedule(self) -> dict[str, float]:
        """The keyword arguments of :func:`renorm_limits` that define this layer's schedule."""
        return {name: getattr(self, name) for name in _SCHEDULE}

    def current_limits(self) -> tuple[float, float]:
        """(r_max, d_max) in force at the next training step (:func:`renorm_limits` at
        ``num_batches_tracked``); (1, 0) without running statistics."""
        if self.num_batches_tracked is None:
            return 1.0, 0.0
        return renorm_limits(int(self.num_batches_tracked), **self.schedule)

    def _forward_batch(self, input: Tensor, factor: float) -> Tensor:
        # the step was counted by _momentum_factor: the limits belong to the step before it
        step = int(self.num_batches_tracked) - 1 if self.num_batches_tracked is not None else 0
        limits = (
            renorm_limits(max(step, 0), **self.schedule) if self.running_mean is not None else None
        )
        x_hat, mean, var, count = _normalise_groups(
            input,
            self.ghost_batch_size,
            self.eps,
            None if limits is None else (self.running_mean.detach(), self.running_var.detach()),
            (1.0, 0.0) if limits is None else limits,
            self._factors,
        )
        self._update_running_stats(mean, var, count, factor)
        return _affine(x_hat, self.weight, self.bias)

    def extra_repr(self) -> str:
        extra = ", ".join(f"{k}={v}" for k, v in self.schedule.items())
        return f"{super().extra_repr()}, {extra}, ghost_batch_size={self.ghost_batch_size}"


class BatchRenorm1d(_BatchRenorm):
    """Batch renormalisation for ``(N, C)`` or ``(N, C, L)`` input; see :class:`BatchRenorm2d`."""


class BatchRenorm2d(_BatchRenorm):
    """Batch renormalisation (Ioffe, 2017) with the arguments, buffers and conventions of
    ``torch.nn.BatchNorm2d``.

    Training normalises with the batch (or group) statistics and corrects towards the running ones,
    ``x̂ = (x − μ_B)/σ_B · r + d`` (equation ``eq-challenges-renorm``), with r and d constants for the
    backward pass (the paper's ``stop_gradient``), so the gradient is batch norm's scaled by r.
    Evaluation is batch norm's inference map with the running statistics.

    Where this departs from the paper, on purpose: the running statistics are PyTorch's (a running
    mean and a running *unbiased variance*, ``BatchNorm2d``'s momentum convention) from which σ is
    derived, where the paper keeps a moving σ. So a ``state_dict`` loads into
    ``torch.nn.BatchNorm2d`` for inference, and with r_max = 1, d_max = 0 the layer *is* batch norm.

    Parameters
    ----------
    num_features, eps, momentum, affine, track_running_stats, device, dtype
        As in ``torch.nn.BatchNorm2d``; without running statistics nothing is corrected (batch norm).
    r_max, d_max : float, keyword-only
        Final clipping limits (the paper's experiments: 3 and 5).
    warmup_steps, r_ramp_steps, d_ramp_steps : int, keyword-only
        The relaxation schedule (:func:`renorm_limits`), counted in ``num_batches_tracked``.
    ghost_batch_size : int or None, keyword-only
        Renormalise each group of this many consecutive samples on its own (default: the batch).

    Shape
    -----
    Input (N, C, H, W); output the same.

    Raises
    ------
    ValueError
        ``r_max < 1``, ``d_max < 0``, a negative step count, ``ghost_batch_size < 1``; and the base's
        input errors (:class:`bnbook.torch._NormBase`).

    >>> layer = BatchRenorm2d(4, warmup_steps=100)
    >>> layer(torch.randn(8, 4, 5, 5)).shape, layer.current_limits()
    (torch.Size([8, 4, 5, 5]), (1.0, 0.0))
    """

    _input_dims = (4,)
    _shape_hint = "(N, C, H, W)"


class GhostBatchNorm1d(_BatchRenorm):
    """Ghost batch norm for ``(N, C)`` or ``(N, C, L)`` input.

    Samples ``0..g-1`` form the first group, ``g..2g-1`` the second, and so on; a last, shorter group
    keeps the remainder. The running statistics move once per step, towards the size-weighted
    average of the groups' means and unbiased variances.

    :class:`BatchRenorm1d` with closed clips: the constructor of ``torch.nn.BatchNorm1d`` plus the
    keyword-only ``ghost_batch_size`` (required). With ``ghost_batch_size >= N`` it is exactly
    ``BatchNorm1d``.

    Examples
    --------
    >>> layer = GhostBatchNorm1d(5, ghost_batch_size=4)
    >>> layer(torch.randn(12, 5)).shape, layer.running_mean.shape
    (torch.Size([12, 5]), torch.Size([5]))
    """

    def __init__(self, num_features: int, *args, ghost_batch_size: int, **kwargs) -> None:
        check_positive_int("ghost_batch_size", ghost_batch_size)
        super().__init__(
            num_features, *args, r_max=1.0, d_max=0.0, ghost_batch_size=ghost_batch_size, **kwargs
        )

    def extra_repr(self) -> str:
        return f"{_NormBase.extra_repr(self)}, ghost_batch_size={self.ghost_batch_size}"


class GhostBatchNorm2d(GhostBatchNorm1d):
    """Ghost batch norm for ``(N, C, H, W)`` input (statistics per group over samples and pixels).

    >>> GhostBatchNorm2d(3, ghost_batch_size=2)(torch.randn(4, 3, 5, 5)).shape
    torch.Size([4, 3, 5, 5])
    """

    _input_dims = (4,)
    _shape_hint = "(N, C, H, W)"


class BatchLayerNorm(_NormBase):
    """Batch Layer Normalisation: batch- and layer-normalised values mixed with the weight 1/m of
    the mini-batch size m (Ziaee & Çano, 2022),

    ``y = γ · [ (1/m) · x̂_layer + (1 − 1/m) · x̂_batch ] + β``.

    ``x̂_batch`` is batch norm's (per channel over (N, *spatial); running statistics in evaluation);
    ``x̂_layer`` is layer norm's (per sample over (C, *spatial); the same in training and
    evaluation). So m = 1 gives layer norm and a large m approaches batch norm. m is the *training*
    mini-batch size, fixed at construction as in the authors' code, so the mix is the same in
    training and evaluation; evaluation is therefore not a per-channel affine map, and the layer is
    never folded into the layer before it.

    What this follows and where it departs (chapter ``ch-family``): the abstract of the paper and the
    authors' public Keras layer (github.com/A2Amir/Batch-Layer-Normalization, ``bln_layer``). That
    code additionally (a) shifts the two weights by 10⁻⁴, (b) divides the mix by sqrt(d) with d the
    number of features, (c) uses ε = 10⁻³, (d) computes the batch statistics per feature *position*
    (over N only) and the feature statistics over the channel axis only, and (e) estimates
    population statistics as an average over an epoch. This module keeps the mixing rule and omits
    (a)–(e). The paper's own equations could not be checked.

    Parameters
    ----------
    num_features, eps, momentum, affine, track_running_stats, device, dtype
        As in ``torch.nn.BatchNorm2d``.
    batch_size : int, keyword-only
        m, the training mini-batch size (≥ 1).
    layer_groups : int, keyword-only
        The layer-normalised part standardises each sample within this many groups of channels
        (1: over all of (C, *spatial), layer norm; more: independent networks side by side).

    >>> BatchLayerNorm(4, batch_size=8)(torch.randn(8, 4, 5, 5)).shape
    torch.Size([8, 4, 5, 5])
    """

    #: evaluation mixes in per-sample statistics: not a fixed affine map per channel
    eval_is_affine = False

    def __init__(
        self, num_features: int, *args, batch_size: int, layer_groups: int = 1, **kwargs
    ) -> None:
        check_positive_int("batch_size", batch_size)
        check_positive_int("layer_groups", layer_groups)
        super().__init__(num_features, *args, **kwargs)
        if num_features % layer_groups:
            raise ValueError(f"layer_groups={layer_groups} must divide num_features={num_features}")
        self.batch_size, self.layer_groups = batch_size, layer_groups

    @property
    def layer_weight(self) -> float:
        """The weight 1/m of the layer-normalised part."""
        return 1.0 / self.batch_size

    def _layer_part(self, input: Tensor) -> Tensor:
        n = input.shape[0]
        per_group = math.prod(input.shape[1:]) // self.layer_groups
        grouped = input.reshape(n, self.layer_groups, per_group)
        x_hat = _standardise(grouped, (2,), self.eps)[0].reshape(input.shape)
        x_hat = x_hat.contiguous(memory_format=_memory_format(input))
        return self.layer_weight * _affine(x_hat, self.weight, self.bias)

    def _forward_batch(self, input: Tensor, factor: float) -> Tensor:
        if self.layer_weight == 1.0:  # m = 1: layer norm, no batch statistics at all
            return self._layer_part(input)
        x_hat, mean, var, count = _normalise_groups(input, None, self.eps)
        self._update_running_stats(mean, var, count, factor)
        batch_part = _affine(x_hat, self.weight, self.bias)
        return self._layer_part(input) + (1.0 - self.layer_weight) * batch_part

    def _forward_running(self, input: Tensor) -> Tensor:
        batch_part = super()._forward_running(input)
        return self._layer_part(input) + (1.0 - self.layer_weight) * batch_part

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, batch_size={self.batch_size}"


class FullNormSketch(_NormBase):
    """The book's sketch of the idea behind Full Normalisation: *not* the authors' algorithm.

    Lian & Liu (2019) show that batch norm minimises a different objective from the one that
    normalises with statistics of the whole dataset, of the form ``E_ξ[ f(E_ζ[g(ζ)], ξ) ]`` (the
    statistics are an expectation *inside* the loss); stochastic compositional methods estimate the
    inner expectation by a running average updated with each batch. This layer does exactly that:

    ``μ_t = μ_{t−1} + α (μ_B − μ_{t−1})``,
    ``v_t = (1 − α) v_{t−1} + α σ²_B + α (1 − α) (μ_B − μ_{t−1})²``

    (the weighted form of Chan's formula for combining two groups' mean and variance), normalises the
    batch with ``(μ_t, v_t)``, and lets the gradient flow through the current batch's share only.
    α is the momentum (``momentum=None``: the cumulative average); the first batch initialises the
    estimates; evaluation normalises with them (``running_mean`` and ``running_var``, here a biased
    variance). With α = 1 the layer is batch norm in training.

    The paper's own update rules could not be checked for this book; use this class to explore the
    objective, not to reproduce the paper's numbers.

    Parameters
    ----------
    num_features, eps, momentum, affine, device, dtype
        As in ``torch.nn.BatchNorm2d``; ``momentum`` is α in (0, 1]. The running estimates are the
        method, so ``track_running_stats`` must be True.
    alpha : float, keyword-only
        The name the method's description gives α; overrides ``momentum`` when given.

    >>> FullNormSketch(4, alpha=0.1)(torch.randn(8, 4, 5, 5)).shape
    torch.Size([8, 4, 5, 5])
    """

    def __init__(self, num_features: int, *args, alpha: float | None = None, **kwargs) -> None:
        if alpha is not None:
            if not (isinstance(alpha, (int, float)) and 0.0 < alpha <= 1.0):
                raise ValueError(f"alpha must be in (0, 1], got {alpha!r}")
            kwargs["momentum"] = float(alpha)
        super().__init__(num_features, *args, **kwargs)
        if not self.track_running_stats:
            raise ValueError("FullNormSketch needs its running estimates: track_running_stats=True")

    @property
    def alpha(self) -> float | None:
        return self.momentum

    def _forward_batch(self, input: Tensor, factor: float) -> Tensor:
        dims = (0, *range(2, input.dim()))
        if input.shape[0] == 0:
            return _affine(input.clone(), self.weight, self.bias)
        check_training_size(input.shape)
        _, mean_b, var_b = _standardise(input, dims, self.eps)
        mean_b, var_b = mean_b.reshape(-1), var_b.reshape(-1)
        a = 1.0 if int(self.num_batches_tracked) == 1 else factor
        prev_mean, prev_var = self.running_mean.detach(), self.running_var.detach()
        delta = mean_b - prev_mean
        mean_t = prev_mean + a * delta
        var_t = (1 - a) * prev_var + a * var_b + a * (1 - a) * delta**2
        with torch.no_grad():
            self.running_mean.copy_(mean_t)
            self.running_var.copy_(var_t)
        shape = (1, -1) + (1,) * (input.dim() - 2)
        x_hat = (input - mean_t.reshape(shape)) * torch.rsqrt(var_t.reshape(shape) + self.eps)
        return _affine(x_hat, self.weight, self.bias)
