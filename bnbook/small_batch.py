"""Batch norm for small and large batches: ghost batch norm and batch renormalisation.

Two variants of :class:`torch.nn.BatchNorm1d` that change only what happens in training mode; in
evaluation mode both are exactly batch norm with population statistics (equation ``eq-bn-normalise``
with the running mean and variance), and their state dicts load into ``torch.nn.BatchNorm*d``.

* **Ghost batch norm** :cite:p:`hoffer2017train` splits a batch of ``N`` samples into groups of
  ``ghost_batch_size`` and normalises each group with its own statistics. It decouples the batch used
  for the gradient step (``N``) from the batch used for the statistics: with a large ``N`` it brings
  back the noise of small-batch statistics, and it is how chapter ``ch-challenges`` simulates
  "small batches per device" at a fixed optimisation batch.
* **Batch renormalisation** :cite:p:`ioffe2017renorm` normalises with the batch statistics but then
  corrects towards the population statistics with per-channel factors treated as constants in the
  backward pass,

  .. math::

      \\hat x = \\frac{x - \\mu_B}{\\sigma_B}\\, r + d, \\qquad
      r = \\operatorname{clip}_{[1/r_{\\max},\\, r_{\\max}]}\\Big(\\frac{\\sigma_B}{\\sigma}\\Big), \\qquad
      d = \\operatorname{clip}_{[-d_{\\max},\\, d_{\\max}]}\\Big(\\frac{\\mu_B - \\mu}{\\sigma}\\Big),

  with :math:`\\sigma_B = \\sqrt{\\sigma_B^2 + \\epsilon}` and :math:`\\sigma = \\sqrt{\\sigma^2_{\\text{run}} +
  \\epsilon}` (label ``eq-challenges-renorm``). When the clips are inactive, ``x̂`` equals
  ``(x - μ)/σ``: training sees the same normalisation as inference.

These are the versions chapter ``ch-challenges`` measures; ``bnbook.norms`` may hold another
``BatchRenorm`` (the lead reconciles the two).

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

import torch
import torch.nn.functional as F
from torch import nn

from bnbook._checks import check_eps, check_momentum, check_num_features, shape_str

__all__ = [
    "ghost_batch_norm",
    "batch_renorm",
    "GhostBatchNorm1d",
    "GhostBatchNorm2d",
    "BatchRenorm1d",
    "BatchRenorm2d",
]


def _check_group_size(ghost_batch_size) -> None:
    if ghost_batch_size is None:
        return
    if (
        isinstance(ghost_batch_size, bool)
        or not isinstance(ghost_batch_size, int)
        or ghost_batch_size < 1
    ):
        raise ValueError(
            f"ghost_batch_size must be None or a positive int, got {ghost_batch_size!r}"
        )


def _check_limits(r_max: float, d_max: float) -> None:
    if not r_max >= 1.0:
        raise ValueError(f"r_max must be >= 1 (r is clipped to [1/r_max, r_max]), got {r_max!r}")
    if not d_max >= 0.0:
        raise ValueError(f"d_max must be >= 0 (d is clipped to [-d_max, d_max]), got {d_max!r}")


def _group_stats(
    input: torch.Tensor, ghost_batch_size: int | None
) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """Split ``input`` (N, C, *) into groups of consecutive samples and take per-group statistics.

    Returns the groups as (G, g, C, L) blocks (a block of full groups, then the remainder), their
    means and biased variances shaped (G, 1, C, 1) (two passes, never E[x²] − E[x]²), and the
    size-weighted averages over all groups of the mean and of the *unbiased* variance, shaped (C,),
    for the running estimates.
    """
    if input.dim() < 2:
        raise ValueError(
            f"expected input of shape (N, C) or (N, C, *spatial), got {shape_str(input.shape)}"
        )
    n, c = input.shape[0], input.shape[1]
    x3 = input.reshape(n, c, -1)
    length = x3.shape[2]
    g = n if ghost_batch_size is None else min(ghost_batch_size, n)
    full, rest = divmod(n, g)
    blocks = [x3[: full * g].reshape(full, g, c, length)]
    if rest:
        blocks.append(x3[full * g :].reshape(1, rest, c, length))
    means, variances = [], []
    mean_sum = x3.new_zeros(c)
    var_sum = x3.new_zeros(c)
    for block in blocks:
        count = block.shape[1] * length
        if count < 2:
            raise ValueError(
                "Expected more than 1 value per channel when training, got a group of "
                f"{block.shape[1]} sample(s) with {count} value per channel (input size "
                f"{shape_str(input.shape)}, ghost_batch_size={ghost_batch_size}): one value has no "
                "variance to normalise by"
            )
        mean = block.mean(dim=(1, 3), keepdim=True)
        var = ((block - mean) ** 2).mean(dim=(1, 3), keepdim=True)
        means.append(mean)
        variances.append(var)
        with torch.no_grad():
            size = block.shape[1]
            mean_sum += mean.reshape(-1, c).sum(0) * size
            var_sum += var.reshape(-1, c).sum(0) * (count / (count - 1)) * size
    return blocks, means, variances, mean_sum / n, var_sum / n


def _update_running(running_mean, running_var, mean, unbiased_var, factor: float) -> None:
    if running_mean is None or running_var is None:
        return
    with torch.no_grad():
        running_mean.mul_(1.0 - factor).add_(mean, alpha=factor)
        running_var.mul_(1.0 - factor).add_(unbiased_var, alpha=factor)


def _affine(x_hat: torch.Tensor, weight, bias, shape: torch.Size) -> torch.Tensor:
    y = x_hat
    if weight is not None:
        y = y * weight[:, None]
    if bias is not None:
        y = y + bias[:, None]
    return y.reshape(shape)


def ghost_batch_norm(
    input: torch.Tensor,
    ghost_batch_size: int | None,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> torch.Tensor:
    """Ghost batch norm: batch norm applied separately to consecutive groups of samples.

    Parameters
    ----------
    input : Tensor
        Shape ``(N, C)`` or ``(N, C, *spatial)``.
    ghost_batch_size : int or None
        Samples per group. Samples ``0..g-1`` form the first group, ``g..2g-1`` the second, and so
        on; a last, shorter group keeps the remainder. ``None`` or ``>= N``: plain batch norm.
    running_mean, running_var : Tensor or None
        Shape ``(C,)``; updated in place in training, once per call, with the size-weighted average
        of the groups' means and unbiased variances. ``None``: no running statistics.
    weight, bias : Tensor or None
        γ and β, shape ``(C,)``.
    training : bool
        Group statistics if True; running statistics if False (then this is exactly
        :func:`torch.nn.functional.batch_norm` in evaluation mode).
    momentum, eps : float
        As in :func:`torch.nn.functional.batch_norm`.

    Returns
    -------
    Tensor
        Same shape as ``input``.

    Raises
    ------
    ValueError
        If ``ghost_batch_size < 1``, or a group holds a single value per channel in training.

    Examples
    --------
    >>> import torch
    >>> x = torch.randn(6, 3)
    >>> y = ghost_batch_norm(x, 3, None, None, training=True)
    >>> torch.allclose(y[:3], torch.nn.functional.batch_norm(x[:3], None, None, training=True))
    True
    """
    _check_group_size(ghost_batch_size)
    if not training and running_mean is not None and running_var is not None:
        return F.batch_norm(input, running_mean, running_var, weight, bias, False, 0.0, eps)
    blocks, means, variances, mean_all, var_all = _group_stats(input, ghost_batch_size)
    c = input.shape[1]
    pieces = [
        ((block - mean) * torch.rsqrt(var + eps)).reshape(-1, c, block.shape[3])
        for block, mean, var in zip(blocks, means, variances, strict=True)
    ]
    x_hat = torch.cat(pieces) if len(pieces) > 1 else pieces[0]
    if training:
        _update_running(running_mean, running_var, mean_all, var_all, momentum)
    return _affine(x_hat, weight, bias, input.shape)


def batch_renorm(
    input: torch.Tensor,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    r_max: float = 3.0,
    d_max: float = 5.0,
    ghost_batch_size: int | None = None,
) -> torch.Tensor:
    """Batch renormalisation (Ioffe, 2017), equation ``eq-challenges-renorm``.

    Parameters
    ----------
    input : Tensor
        Shape ``(N, C)`` or ``(N, C, *spatial)``.
    running_mean, running_var : Tensor
        Shape ``(C,)``: the population estimates μ and σ²_run (unbiased variance, as in torch);
        updated in place in training.
    weight, bias : Tensor or None
        γ and β, shape ``(C,)``.
    training : bool
        Renormalised batch statistics if True; running statistics if False.
    momentum, eps : float
        As in :func:`torch.nn.functional.batch_norm`.
    r_max, d_max : float
        Clipping bounds of the correction factors ``r`` (to ``[1/r_max, r_max]``) and ``d`` (to
        ``[-d_max, d_max]``). ``r_max = 1, d_max = 0`` is plain batch norm.
    ghost_batch_size : int or None
        If given, statistics, ``r`` and ``d`` are computed per group of this many consecutive
        samples, as in :func:`ghost_batch_norm` (the "microbatches" of Ioffe, 2017).

    Returns
    -------
    Tensor
        Same shape as ``input``.

    Raises
    ------
    ValueError
        If ``r_max < 1``, ``d_max < 0``, or a group holds one value per channel in training.

    Examples
    --------
    >>> import torch
    >>> x = torch.randn(16, 3)
    >>> mean, var = torch.zeros(3), torch.ones(3)
    >>> batch_renorm(x, mean, var, training=True, r_max=1.0, d_max=0.0).shape
    torch.Size([16, 3])
    """
    _check_limits(r_max, d_max)
    _check_group_size(ghost_batch_size)
    if not training:
        return F.batch_norm(input, running_mean, running_var, weight, bias, False, 0.0, eps)
    blocks, means, variances, mean_all, var_all = _group_stats(input, ghost_batch_size)
    c = input.shape[1]
    std_run = torch.sqrt(running_var + eps)[:, None]  # (C, 1), broadcast against (G, g, C, L)
    pieces = []
    for block, mean, var in zip(blocks, means, variances, strict=True):
        std_batch = torch.sqrt(var + eps)
        with torch.no_grad():  # r and d are constants in the backward pass ("stop_gradient")
            r = (std_batch / std_run).clamp(1.0 / r_max, r_max)
            d = ((mean - running_mean[:, None]) / std_run).clamp(-d_max, d_max)
        pieces.append(((block - mean) / std_batch * r + d).reshape(-1, c, block.shape[3]))
    x_hat = torch.cat(pieces) if len(pieces) > 1 else pieces[0]
    _update_running(running_mean, running_var, mean_all, var_all, momentum)
    return _affine(x_hat, weight, bias, input.shape)


class _SmallBatchNormBase(nn.Module):
    _expected_dims: tuple[int, ...] = (2, 3)

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        check_num_features(num_features)
        check_eps(eps)
        check_momentum(momentum)
        factory = {"device": device, "dtype": dtype}
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        self.track_running_stats = track_running_stats
        if affine:
            self.weight = nn.Parameter(torch.ones(num_features, **factory))
            self.bias = nn.Parameter(torch.zeros(num_features, **factory))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_features, **factory))
            self.register_buffer("running_var", torch.ones(num_features, **factory))
            self.register_buffer(
                "num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device)
            )
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)

    def reset_running_stats(self) -> None:
        if self.track_running_stats:
            self.running_mean.zero_()
            self.running_var.fill_(1.0)
            self.num_batches_tracked.zero_()

    def _check_input(self, input: torch.Tensor) -> None:
        if input.dim() not in self._expected_dims:
            want = " or ".join(f"{d}D" for d in self._expected_dims)
            raise ValueError(
                f"expected {want} input, got {input.dim()}D input of shape {shape_str(input.shape)}"
            )
        if input.shape[1] != self.num_features:
            raise ValueError(
                f"expected input with {self.num_features} channels in dim 1, got shape {shape_str(input.shape)}"
            )

    def _factor(self) -> float:
        """Momentum of this step's running-statistics update (counting the step), as torch does."""
        if not (self.training and self.track_running_stats):
            return 0.0
        self.num_batches_tracked.add_(1)
        if self.momentum is None:
            return 1.0 / float(self.num_batches_tracked)
        return self.momentum

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}"
        )


class GhostBatchNorm1d(_SmallBatchNormBase):
    """Ghost batch norm for ``(N, C)`` or ``(N, C, L)`` input: see :func:`ghost_batch_norm`.

    Same constructor arguments, parameters and buffers as :class:`torch.nn.BatchNorm1d`, plus
    ``ghost_batch_size``. With ``ghost_batch_size >= N`` it is exactly ``BatchNorm1d``.

    Parameters
    ----------
    num_features : int
        C, the number of channels.
    ghost_batch_size : int
        Samples per normalisation group.
    eps, momentum, affine, track_running_stats, device, dtype
        As in :class:`torch.nn.BatchNorm1d`.

    Shape
    -----
    Input ``(N, C)`` or ``(N, C, L)``; output the same.

    Examples
    --------
    >>> import torch
    >>> layer = GhostBatchNorm1d(5, ghost_batch_size=4)
    >>> layer(torch.randn(12, 5)).shape, layer.running_mean.shape
    (torch.Size([12, 5]), torch.Size([5]))
    """

    def __init__(
        self,
        num_features: int,
        ghost_batch_size: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        _check_group_size(ghost_batch_size)
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        self.ghost_batch_size = ghost_batch_size

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input(input)
        factor = self._factor()
        return ghost_batch_norm(
            input,
            self.ghost_batch_size,
            self.running_mean,
            self.running_var,
            self.weight,
            self.bias,
            training=self.training or not self.track_running_stats,
            momentum=factor,
            eps=self.eps,
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, ghost_batch_size={self.ghost_batch_size}"


class GhostBatchNorm2d(GhostBatchNorm1d):
    """Ghost batch norm for ``(N, C, H, W)`` input (statistics per group over samples and pixels).

    >>> import torch
    >>> GhostBatchNorm2d(3, ghost_batch_size=2)(torch.randn(4, 3, 5, 5)).shape
    torch.Size([4, 3, 5, 5])
    """

    _expected_dims = (4,)


class BatchRenorm1d(_SmallBatchNormBase):
    """Batch renormalisation for ``(N, C)`` or ``(N, C, L)`` input: see :func:`batch_renorm`.

    Same parameters and buffers as :class:`torch.nn.BatchNorm1d` (its state dict loads there),
    and in evaluation mode the same function. The clipping bounds grow linearly from ``(1, 0)``
    (plain batch norm) to ``(r_max, d_max)`` over the first ``warmup_steps`` training steps, a
    compressed version of the schedule of :cite:t:`ioffe2017renorm`, so that the running statistics
    mean something before they are trusted. ``bnbook.norms.BatchRenorm1d`` is the family chapter's
    version (a warm-up then separate ramps); this one adds ``ghost_batch_size``.

    Parameters
    ----------
    num_features : int
        C, the number of channels.
    r_max, d_max : float
        Final clipping bounds (the paper's values: 3 and 5).
    warmup_steps : int
        Training steps over which the bounds ramp up; 0 uses the final bounds at once.
    ghost_batch_size : int or None
        Renormalise each group of this many consecutive samples on its own (default: the batch).
    eps, momentum, affine, device, dtype
        As in :class:`torch.nn.BatchNorm1d` (running statistics are always tracked:
        renormalisation needs them).

    Shape
    -----
    Input ``(N, C)`` or ``(N, C, L)``; output the same.

    Raises
    ------
    ValueError
        If ``r_max < 1``, ``d_max < 0``, ``warmup_steps < 0`` or ``ghost_batch_size < 1``.

    Examples
    --------
    >>> import torch
    >>> layer = BatchRenorm1d(5, warmup_steps=100)
    >>> layer(torch.randn(2, 5)).shape, layer.current_limits()
    (torch.Size([2, 5]), (1.02, 0.05))
    """

    def __init__(
        self,
        num_features: int,
        r_max: float = 3.0,
        d_max: float = 5.0,
        warmup_steps: int = 0,
        ghost_batch_size: int | None = None,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        _check_limits(r_max, d_max)
        _check_group_size(ghost_batch_size)
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ValueError(f"warmup_steps must be a non-negative int, got {warmup_steps!r}")
        super().__init__(num_features, eps, momentum, affine, True, device, dtype)
        self.r_max, self.d_max, self.warmup_steps = float(r_max), float(d_max), warmup_steps
        self.ghost_batch_size = ghost_batch_size

    def current_limits(self) -> tuple[float, float]:
        """The clipping bounds ``(r_max, d_max)`` in force after ``num_batches_tracked`` steps."""
        if self.warmup_steps == 0:
            return self.r_max, self.d_max
        frac = min(1.0, int(self.num_batches_tracked) / self.warmup_steps)
        return 1.0 + (self.r_max - 1.0) * frac, self.d_max * frac

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input(input)
        if not self.training:
            return F.batch_norm(
                input,
                self.running_mean,
                self.running_var,
                self.weight,
                self.bias,
                False,
                0.0,
                self.eps,
            )
        r_max, d_max = self.current_limits()  # this step's bounds, before counting the step
        factor = self._factor()
        return batch_renorm(
            input,
            self.running_mean,
            self.running_var,
            self.weight,
            self.bias,
            training=True,
            momentum=factor,
            eps=self.eps,
            r_max=r_max,
            d_max=d_max,
            ghost_batch_size=self.ghost_batch_size,
        )

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, r_max={self.r_max}, d_max={self.d_max}, "
            f"warmup_steps={self.warmup_steps}, ghost_batch_size={self.ghost_batch_size}"
        )


class BatchRenorm2d(BatchRenorm1d):
    """Batch renormalisation for ``(N, C, H, W)`` input.

    >>> import torch
    >>> BatchRenorm2d(3)(torch.randn(4, 3, 5, 5)).shape
    torch.Size([4, 3, 5, 5])
    """

    _expected_dims = (4,)
