"""Looking inside a network: activations per layer, their percentiles over training, and what whitening costs.

Chapter ``ch-why`` asks three questions of a network, and this module answers them:

* **How big are the activations in each layer?** :func:`module_inputs` runs a model on a batch and
  returns the input of chosen modules (e.g. of every activation function); :func:`init_scaled_`
  draws weights with a chosen gain, so the growth or decay of the scale with depth can be measured.
* **How does one unit's input distribution move during training?** :class:`PercentileRecorder`, a
  callback for :func:`bnbook.train.train_classifier`, records chosen percentiles of a module's input
  on a fixed batch at every evaluation point (the experiment behind Figure 1 of Ioffe and Szegedy,
  2015); :func:`percentile_drift` says how far they moved.
* **Why not whiten every layer instead?** :func:`whitening_flops` and :func:`batch_norm_flops` count
  the floating-point operations of full (ZCA) whitening and of per-feature batch normalisation of an
  ``(m, d)`` mini-batch; :func:`zca_whiten` is the differentiable whitening itself, for timing it.

>>> import torch
>>> from bnbook.models import mlp
>>> from bnbook.activations import module_inputs, input_percentiles
>>> net = mlp((784, 100, 100, 10), activation="sigmoid")
>>> x = torch.rand(64, 784)
>>> [z.shape for z in module_inputs(net, x, [net[1], net[3]])]   # inputs of the two sigmoids
[torch.Size([64, 100]), torch.Size([64, 100])]
>>> input_percentiles(net, net[3], x).shape                       # (15th, 50th, 85th) x 100 units
(3, 100)
>>> whitening_flops(60, 100).total > 100 * batch_norm_flops(60, 100).total
True
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor, nn

__all__ = [
    "module_inputs",
    "input_percentiles",
    "PercentileRecorder",
    "percentile_drift",
    "init_scaled_",
    "FlopCount",
    "whitening_flops",
    "batch_norm_flops",
    "zca_whiten",
]

ModuleSelector = int | nn.Module | Callable[[nn.Module], nn.Module]


def _is_running_stats_norm(module: nn.Module) -> bool:
    """A normalisation layer that keeps running statistics (torch's or bnbook's batch norm)."""
    return isinstance(getattr(module, "running_mean", None), Tensor) and hasattr(module, "momentum")


@contextmanager
def _batch_statistics(model: nn.Module, enabled: bool):
    """Normalise with the statistics of the current batch, leaving every buffer as it was.

    Batch-norm layers are put in training mode (so they use the batch's mean and variance, as they
    do during training); their running statistics are saved before and restored after, so looking
    does not change the model. Every other module keeps its mode (dropout stays off in eval mode).
    """
    norms = [m for m in model.modules() if _is_running_stats_norm(m)] if enabled else []
    saved = [
        (m, m.training, {k: b.clone() for k, b in m.named_buffers(recurse=False)}) for m in norms
    ]
    try:
        for m in norms:
            m.train()
        yield
    finally:
        with torch.no_grad():
            for m, mode, buffers in saved:
                for name, value in buffers.items():
                    getattr(m, name).copy_(value)
                m.train(mode)


def _resolve(model: nn.Module, selector: ModuleSelector) -> nn.Module:
    if isinstance(selector, nn.Module):
        return selector
    if isinstance(selector, int) and not isinstance(selector, bool):
        if not isinstance(model, nn.Sequential):
            raise TypeError(
                f"an int module index needs an nn.Sequential model, got {type(model).__name__}; "
                "pass the module itself or a function model -> module"
            )
        if not -len(model) <= selector < len(model):
            raise IndexError(
                f"module index {selector} out of range for a Sequential of {len(model)} modules"
            )
        return model[selector]
    if callable(selector):
        module = selector(model)
        if not isinstance(module, nn.Module):
            raise TypeError(
                f"the module selector returned {type(module).__name__}, not an nn.Module"
            )
        return module
    raise TypeError(
        f"module must be an nn.Module, an int index or a function model -> module, got {selector!r}"
    )


@torch.no_grad()
def module_inputs(
    model: nn.Module,
    x: Tensor,
    modules: Sequence[ModuleSelector],
    *,
    batch_stats: bool = False,
) -> list[Tensor]:
    """Run ``model`` on ``x`` and return the input that each of ``modules`` received.

    The model is run in its current mode, without gradients, and is left unchanged (buffers
    included).

    Parameters
    ----------
    model : nn.Module
    x : Tensor
        A batch the model accepts.
    modules : sequence of nn.Module, int or callable
        The modules to watch: the modules themselves, indices into an ``nn.Sequential`` model, or
        functions ``model -> module``. Each must be called exactly once in the forward pass.
    batch_stats : bool
        If True, batch-norm layers normalise with the mean and variance of ``x`` (what they do in
        training) instead of their running averages; the running averages are not updated.

    Returns
    -------
    list of Tensor
        The (first positional) input of each module, detached, in the order of ``modules``.

    Raises
    ------
    RuntimeError
        A watched module was not called, or was called more than once.

    Examples
    --------
    >>> import torch
    >>> from bnbook.models import mlp
    >>> net = mlp((5, 4, 2), activation="tanh")
    >>> (z,) = module_inputs(net, torch.zeros(3, 5), [1])   # the input of net[1], the Tanh
    >>> z.shape
    torch.Size([3, 4])
    """
    targets = [_resolve(model, m) for m in modules]
    captured: list[list[Tensor]] = [[] for _ in targets]
    handles = []

    def make_hook(slot: list[Tensor]):
        def hook(_module, args, _output):
            slot.append(args[0].detach().clone())

        return hook

    try:
        for target, slot in zip(targets, captured, strict=True):
            handles.append(target.register_forward_hook(make_hook(slot)))
        with _batch_statistics(model, batch_stats):
            model(x)
    finally:
        for h in handles:
            h.remove()
    for i, slot in enumerate(captured):
        if len(slot) != 1:
            raise RuntimeError(
                f"module {i} of modules ({type(targets[i]).__name__}) was called {len(slot)} times "
                "in one forward pass; module_inputs needs exactly one call"
            )
    return [slot[0] for slot in captured]


def input_percentiles(
    model: nn.Module,
    module: ModuleSelector,
    x: Tensor,
    q: Sequence[float] = (15, 50, 85),
    *,
    batch_stats: bool = True,
) -> np.ndarray:
    """Percentiles, over the batch ``x``, of each feature of ``module``'s input.

    Parameters
    ----------
    model, x
        As in :func:`module_inputs`.
    module : nn.Module, int or callable
        The module whose input is summarised (e.g. the last sigmoid).
    q : sequence of float
        Percentiles in [0, 100].
    batch_stats : bool
        As in :func:`module_inputs`; True by default, so a batch-normalised unit is summarised as
        the sigmoid sees it during training.

    Returns
    -------
    ndarray, shape (len(q), features)
        ``features`` is the size of dimension 1 of the input (the input is flattened to
        ``(N, features)`` for an ``(N, C)`` input; for ``(N, C, *spatial)`` it is summarised per channel
        over N and the spatial positions).

    Raises
    ------
    ValueError
        A percentile outside [0, 100].
    """
    q = np.asarray(q, dtype=float)
    if q.ndim != 1 or np.any((q < 0) | (q > 100)):
        raise ValueError(f"q must be a sequence of percentiles in [0, 100], got {q.tolist()}")
    (z,) = module_inputs(model, x, [module], batch_stats=batch_stats)
    if z.dim() < 2:
        raise ValueError(f"the module's input must have shape (N, C, ...), got {tuple(z.shape)}")
    z = z.transpose(0, 1).reshape(z.shape[1], -1).T  # (N * spatial, C)
    return np.percentile(z.double().cpu().numpy(), q, axis=0)


class PercentileRecorder:
    """A training callback that records percentiles of one module's input on a fixed batch.

    Pass it as ``callback=`` to :func:`bnbook.train.train_classifier`; it is called as
    ``recorder(step, model)`` at every evaluation point.

    Parameters
    ----------
    x : Tensor
        The fixed batch (e.g. the test images), the same at every call.
    module : nn.Module, int or callable
        The module whose input is recorded (an int indexes an ``nn.Sequential``).
    q : sequence of float
        Percentiles (default 15th, 50th, 85th, as in Figure 1 of Ioffe and Szegedy, 2015).
    batch_stats : bool
        As in :func:`input_percentiles`.

    Attributes
    ----------
    steps : list of int
        The steps at which it was called.
    percentiles : ndarray, shape (len(steps), len(q), features)

    Examples
    --------
    >>> import torch
    >>> from bnbook.models import mlp
    >>> net = mlp((5, 4, 2), activation="sigmoid")
    >>> rec = PercentileRecorder(torch.randn(10, 5), module=1)
    >>> rec(0, net); rec(10, net)
    >>> rec.steps, rec.percentiles.shape
    ([0, 10], (2, 3, 4))
    """

    def __init__(
        self,
        x: Tensor,
        module: ModuleSelector,
        q: Sequence[float] = (15, 50, 85),
        *,
        batch_stats: bool = True,
    ) -> None:
        self.x = x
        self.module = module
        self.q = tuple(float(v) for v in q)
        self.batch_stats = batch_stats
        self.steps: list[int] = []
        self._records: list[np.ndarray] = []

    def __call__(self, step: int, model: nn.Module) -> None:
        x = self.x.to(next(model.parameters()).device)
        self._records.append(
            input_percentiles(model, self.module, x, self.q, batch_stats=self.batch_stats)
        )
        self.steps.append(int(step))

    @property
    def percentiles(self) -> np.ndarray:
        if not self._records:
            return np.empty((0, len(self.q), 0))
        return np.stack(self._records)


def percentile_drift(percentiles: np.ndarray, start: int = 0, stop: int = -1) -> np.ndarray:
    """How far each feature's percentiles moved between two recorded points.

    The mean, over the recorded percentiles, of ``|p[stop] - p[start]|``: in the units of the
    recorded quantity (for a sigmoid input: how far along the sigmoid's axis the distribution moved).

    Parameters
    ----------
    percentiles : ndarray, shape (T, Q, F)
        From :attr:`PercentileRecorder.percentiles`.
    start, stop : int
        Indices of the two recorded points (default the first and the last).

    Returns
    -------
    ndarray, shape (F,)

    Examples
    --------
    >>> p = np.zeros((3, 3, 2)); p[-1, :, 1] = [1.0, 2.0, 3.0]
    >>> percentile_drift(p)
    array([0., 2.])
    """
    p = np.asarray(percentiles, dtype=float)
    if p.ndim != 3:
        raise ValueError(
            f"percentiles must have shape (T, Q, F) (recorded points, percentiles, features), "
            f"got {p.shape}"
        )
    return np.abs(p[stop] - p[start]).mean(axis=0)


@torch.no_grad()
def init_scaled_(model: nn.Module, gain: float, *, bias: float = 0.0) -> nn.Module:
    """Draw every ``nn.Linear`` weight from N(0, gain² / fan_in), in place; biases set to ``bias``.

    ``gain = 1`` keeps the variance of a linear layer's output equal to the mean square of its input;
    ``gain = sqrt(2)`` is He et al.'s choice for ReLU networks; chapter ``ch-why`` derives both.

    Parameters
    ----------
    model : nn.Module
    gain : float
        Non-negative.
    bias : float
        Value of every bias.

    Returns
    -------
    nn.Module
        ``model``, for chaining.
    """
    if not (math.isfinite(gain) and gain >= 0):
        raise ValueError(f"gain must be a finite number >= 0, got {gain!r}")
    for module in model.modules():
        if isinstance(module, nn.Linear):
            module.weight.normal_(0.0, gain / math.sqrt(module.in_features))
            if module.bias is not None:
                module.bias.fill_(bias)
    return model


class FlopCount(NamedTuple):
    """Floating-point operations (a multiply-add counts as 2) of one normalisation, by stage."""

    statistics: int  #: mean and (co)variance of the mini-batch
    factorisation: int  #: turning the (co)variance into the normalising matrix / scale
    apply: int  #: normalising the m × d mini-batch (and γ, β for batch norm)

    @property
    def total(self) -> int:
        return self.statistics + self.factorisation + self.apply


def _check_md(m: int, d: int) -> None:
    for name, v in (("m", m), ("d", d)):
        if isinstance(v, bool) or not isinstance(v, int | np.integer) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")


def whitening_flops(m: int, d: int) -> FlopCount:
    """Operations to ZCA-whiten an (m, d) mini-batch: ``(x − μ) Σ^{-1/2}``.

    Counted as: mean ``m·d`` additions; covariance ``(x − μ)ᵀ(x − μ)``, ``m·d`` subtractions then
    ``m·d²`` multiply-adds (both triangles, as a GEMM computes them); symmetric eigendecomposition
    with eigenvectors ≈ ``9 d³`` (the standard estimate for the symmetric QR algorithm; Golub and
    Van Loan, *Matrix Computations*, 4th ed., Sec. 8.3); ``Σ^{-1/2} = U diag(λ^{-1/2}) Uᵀ``,
    ``d³`` multiply-adds (+ ``2d`` for the square roots); applying it, ``m·d²`` multiply-adds.

    Parameters
    ----------
    m, d : int
        Mini-batch size and number of features.

    Returns
    -------
    FlopCount
        ``statistics = m·d + m·d + 2·m·d²``, ``factorisation = 9·d³ + 2·d³ + 2·d``,
        ``apply = 2·m·d²``.

    Examples
    --------
    >>> whitening_flops(60, 100)
    FlopCount(statistics=1212000, factorisation=11000200, apply=1200000)
    """
    _check_md(m, d)
    m, d = int(m), int(d)
    return FlopCount(
        statistics=2 * m * d + 2 * m * d * d,
        factorisation=9 * d**3 + 2 * d**3 + 2 * d,
        apply=2 * m * d * d,
    )


def batch_norm_flops(m: int, d: int) -> FlopCount:
    """Operations of batch normalisation, equations (1)–(4), of an (m, d) mini-batch.

    Counted as: mean ``m·d``; variance, ``m·d`` subtractions and ``m·d`` multiply-adds;
    per-feature scale ``γ/sqrt(σ² + ε)``, ``3·d``; applying ``(x − μ)·scale + β``, ``3·m·d``.

    Parameters
    ----------
    m, d : int
        Mini-batch size and number of features.

    Returns
    -------
    FlopCount
        ``statistics = 4·m·d``, ``factorisation = 3·d``, ``apply = 3·m·d``.

    Examples
    --------
    >>> batch_norm_flops(60, 100)
    FlopCount(statistics=24000, factorisation=300, apply=18000)
    """
    _check_md(m, d)
    m, d = int(m), int(d)
    return FlopCount(statistics=4 * m * d, factorisation=3 * d, apply=3 * m * d)


def zca_whiten(x: Tensor, eps: float = 1e-5) -> Tensor:
    """ZCA-whiten a mini-batch: ``(x − μ) (Σ + εI)^{-1/2}``, differentiable (through ``eigh``).

    The output's covariance (with the biased 1/m convention of equation (2)) is the identity when
    ``m > d`` and ε → 0. With ``m ≤ d`` the sample covariance has rank at most ``m − 1`` and only ε
    keeps the inverse square root finite.

    Parameters
    ----------
    x : Tensor, shape (m, d)
        Floating point; m ≥ 2.
    eps : float
        Added to the covariance's diagonal; > 0.

    Returns
    -------
    Tensor, shape (m, d)

    Raises
    ------
    ValueError
        ``x`` not 2-D, fewer than 2 rows, or ``eps <= 0``.

    Examples
    --------
    >>> x = torch.randn(500, 3, dtype=torch.float64) @ torch.tensor([[2.0, 1, 0], [0, 1, 0], [0, 0, 3]],
    ...                                                            dtype=torch.float64)
    >>> w = zca_whiten(x, eps=1e-12)
    >>> w.shape, torch.allclose(w.T @ w / 500, torch.eye(3, dtype=torch.float64), atol=1e-8)
    (torch.Size([500, 3]), True)
    """
    if not isinstance(x, Tensor) or x.dim() != 2 or x.shape[0] < 2:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"x must be a tensor of shape (m, d) with m >= 2, got {shape}")
    if not (math.isfinite(eps) and eps > 0):
        raise ValueError(f"eps must be a positive number, got {eps!r}")
    centred = x - x.mean(dim=0)
    cov = centred.T @ centred / x.shape[0]
    cov = cov + eps * torch.eye(x.shape[1], dtype=x.dtype, device=x.device)
    eigvals, eigvecs = torch.linalg.eigh(cov)
    inv_sqrt = (eigvecs * eigvals.rsqrt()) @ eigvecs.T
    return centred @ inv_sqrt
