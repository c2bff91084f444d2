"""The chapters' instruments: what a network or a training run is measured by.

* :func:`internal_covariate_shift` (equation ``eq-why-ics``) and :func:`smoothness` (equation
  ``eq-why-smoothness``), two measurements of :cite:t:`santurkar2018how` taken at the current
  weights of a network on one mini-batch, without disturbing the network (each works on copies,
  so parameters, gradients and running statistics are left as they were): how much a layer's
  gradient changes when only the layers *below* it take their SGD step (a relative ℓ2 distance
  and a cosine), and, along the step direction ``-g``, the range of the loss, the largest change
  of the gradient, and that change divided by the step length (a lower bound on the smoothness
  constant K, the "effective β-smoothness" of the paper);
* :func:`precise_bn`: population statistics re-estimated at the current weights (chapters
  ``ch-inference`` and ``ch-challenges``);
* :func:`steps_to_target` and :func:`largest_trainable`: summaries of a sweep of runs.

Both take an ordinary ``nn.Sequential`` or the stacked networks of :func:`bnbook.stacked.stacked_mlp`
(``S`` independent networks in one): a loss that returns one value per network, shape ``(S,)``,
makes every result per network. The layer's mode is used as it is (training mode: batch statistics).

>>> import torch
>>> from torch import nn
>>> from bnbook.measure import internal_covariate_shift, smoothness
>>> _ = torch.manual_seed(0)
>>> net = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 3))
>>> x, y = torch.randn(16, 8), torch.randint(0, 3, (16,))
>>> internal_covariate_shift(net, x, y, lr=0.1).shape   # one hidden layer: (relative l2, cosine)
(1, 2)
>>> smoothness(net, x, y).shape        # loss range, gradient predictiveness, effective K
(3,)
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bnbook.fusion import is_batch_norm

__all__ = [
    "ETAS",
    "per_model_cross_entropy",
    "loss_and_gradients",
    "weighted_layers",
    "internal_covariate_shift",
    "smoothness",
    "precise_bn",
    "steps_to_target",
    "largest_trainable",
]

#: Step sizes along ``-g`` at which :func:`smoothness` evaluates the loss and the gradient: eight
#: points from 0.05 to 0.4, the range of :cite:t:`santurkar2018how`'s figure 4.
ETAS: tuple[float, ...] = tuple(float(e) for e in np.linspace(0.05, 0.4, 8))

LossFn = Callable[[Tensor, Tensor], Tensor]


def per_model_cross_entropy(logits: Tensor, target: Tensor) -> Tensor:
    """Mean cross-entropy over the mini-batch, one value per network.

    Parameters
    ----------
    logits : Tensor
        (N, K) for one network, or (S, N, K) for S stacked networks.
    target : Tensor
        Class indices, (N,), or (S, N) (one mini-batch per network); an (N,) target is shared.

    Returns
    -------
    Tensor
        A 0-d tensor for (N, K) logits; shape (S,) for (S, N, K) logits.

    Raises
    ------
    ValueError
        If ``logits`` has neither 2 nor 3 dimensions.

    >>> per_model_cross_entropy(torch.zeros(4, 5, 10), torch.zeros(4, 5, dtype=torch.long)).shape
    torch.Size([4])
    """
    if logits.dim() == 2:
        return F.cross_entropy(logits, target)
    if logits.dim() != 3:
        raise ValueError(f"logits must be (N, K) or (S, N, K), got shape {tuple(logits.shape)}")
    s, n, k = logits.shape
    target = target.expand(s, n) if target.dim() == 1 else target
    losses = F.cross_entropy(logits.reshape(s * n, k), target.reshape(s * n), reduction="none")
    return losses.view(s, n).mean(1)


def _trainable(model: nn.Module) -> list[Tensor]:
    return [p for p in model.parameters() if p.requires_grad]


def loss_and_gradients(
    model: nn.Module, x: Tensor, y: Tensor, loss: LossFn = per_model_cross_entropy
) -> tuple[Tensor, list[Tensor]]:
    """The loss on ``(x, y)`` and its gradient with respect to every trainable parameter.

    The gradients are returned, not accumulated into ``.grad``; a parameter the loss does not
    depend on gets a zero gradient. The forward pass runs in the model's current mode, so in
    training mode it updates running statistics: pass a copy to keep them.

    Returns
    -------
    value : Tensor
        ``loss(model(x), y)``, detached: 0-d, or (S,) for S stacked networks.
    grads : list of Tensor
        One per trainable parameter, in ``model.parameters()`` order, each shaped like it.
    """
    params = _trainable(model)
    value = loss(model(x), y)
    if value.dim() > 1:
        raise ValueError(f"loss must return a 0-d or (S,) tensor, got shape {tuple(value.shape)}")
    grads = torch.autograd.grad(value.sum(), params, allow_unused=True)
    grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads, strict=True)]
    return value.detach(), grads


def weighted_layers(model: nn.Sequential) -> list[int]:
    """Indices of the layers of ``model`` that hold a weight matrix or kernel.

    These are ``nn.Linear``, the convolutions and :class:`bnbook.stacked.StackedLinear`;
    normalisation layers (whose ``weight`` is γ) and activations are not counted.

    >>> weighted_layers(nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2)))
    [0, 3]
    """
    from bnbook.stacked import StackedLinear  # noqa: PLC0415 (stacked → models → …)

    kinds = (nn.Linear, nn.modules.conv._ConvNd, StackedLinear)
    return [k for k, m in enumerate(model) if isinstance(m, kinds)]


def _n_models(value: Tensor, params: Sequence[Tensor]) -> int:
    """S for a (S,) loss (checking that every parameter splits into S equal parts), else 1."""
    if value.dim() == 0:
        return 1
    s = value.numel()
    for p in params:
        if p.numel() % s:
            raise ValueError(
                f"a loss of shape ({s},) means {s} stacked networks, whose parameters are laid out "
                f"network-major, but a parameter of shape {tuple(p.shape)} does not split into {s}"
            )
    return s


def _per_model(tensors: Sequence[Tensor], s: int) -> Tensor:
    """Concatenate tensors into one (S, P) matrix: row s holds network s's entries."""
    return torch.cat([t.reshape(s, -1) for t in tensors], dim=1)


def _to_numpy(per_model: Tensor, stacked: bool) -> np.ndarray:
    """(S, ...) results as float64 NumPy on the CPU; the leading axis dropped for one network."""
    arr = per_model.detach().to("cpu", torch.float64).numpy()
    return arr if stacked else arr[0]


def _check_sequential(model: nn.Module) -> None:
    if not isinstance(model, nn.Sequential):
        raise TypeError(f"model must be an nn.Sequential, got {type(model).__name__}")


def internal_covariate_shift(
    model: nn.Sequential,
    x: Tensor,
    y: Tensor,
    lr: float,
    *,
    layers: Sequence[int] | None = None,
    loss: LossFn = per_model_cross_entropy,
) -> np.ndarray:
    """Internal covariate shift of :cite:t:`santurkar2018how` (equation ``eq-why-ics``).

    For each measured layer ``k``, compare the gradient ``G`` of its weight at the current
    parameters with the gradient ``G'`` after every parameter of the layers *before* it (indices
    ``< k`` in the ``Sequential``) has taken one SGD step of size ``lr`` along its own gradient,
    on the same mini-batch, while layer ``k`` and the layers after it stay where they are.

    Parameters
    ----------
    model : nn.Sequential
        The network, in the mode to measure (training mode: batch statistics). It is not
        changed: the steps are taken on copies. Its forward pass must be deterministic (no
        dropout active).
    x, y : Tensor
        One mini-batch, as ``loss(model(x), y)`` expects it.
    lr : float
        Learning rate of the SGD step of the earlier layers (>= 0).
    layers : sequence of int, optional
        Indices into ``model`` of the layers to measure, each one of :func:`weighted_layers`.
        Default: every weighted layer except the first (which has no layer below it) and the
        last (the output layer).
    loss : callable
        ``loss(output, y)``, 0-d for one network, or (S,) for S stacked networks (default
        :func:`per_model_cross_entropy`).

    Returns
    -------
    ndarray of float64
        ``[relative ℓ2, cosine]`` per measured layer: ``‖G − G'‖ / ‖G‖`` and ``cos(G, G')``.
        0 and 1 mean no shift. NaN where ``G`` is zero.

    Shape
    -----
    (L, 2) for L measured layers of one network; (S, L, 2) for S stacked networks.

    Raises
    ------
    TypeError
        If ``model`` is not an ``nn.Sequential``.
    ValueError
        If ``lr`` is negative or not finite, if a layer index is not a weighted layer, if the
        default leaves no layer to measure, or if the loss has a shape other than () or (S,).

    Examples
    --------
    With ``lr = 0`` the earlier layers do not move, so there is no shift at all:

    >>> _ = torch.manual_seed(0)
    >>> net = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 3))
    >>> x, y = torch.randn(16, 8), torch.randint(0, 3, (16,))
    >>> internal_covariate_shift(net, x, y, lr=0.0).round(6)
    array([[0., 1.]])
    """
    _check_sequential(model)
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr >= 0):
        raise ValueError(f"lr must be a finite number >= 0, got {lr!r}")
    weighted = weighted_layers(model)
    if layers is None:
        layers = weighted[1:-1]
        if not layers:
            raise ValueError(
                f"model has {len(weighted)} weighted layers: the default measures those between "
                "the first and the last, and there are none; pass layers="
            )
    layers = list(layers)
    for k in layers:
        if k not in weighted:
            raise ValueError(f"layers must index weighted layers {weighted}, got {k!r}")
    value, grads = loss_and_gradients(copy.deepcopy(model), x, y, loss)
    s = _n_models(value, grads)
    rows = []
    for k in layers:
        moved = copy.deepcopy(model)
        params = _trainable(moved)
        earlier = {id(p) for j in range(k) for p in moved[j].parameters()}
        with torch.no_grad():  # the layers below k take their step; k and above do not
            for p, g in zip(params, grads, strict=True):
                if id(p) in earlier:
                    p.sub_(lr * g)
        _, grads_after = loss_and_gradients(moved, x, y, loss)
        i = next(j for j, p in enumerate(params) if p is moved[k].weight)
        a, b = grads[i].reshape(s, -1), grads_after[i].reshape(s, -1)
        rel = (a - b).norm(dim=1) / a.norm(dim=1)
        rows.append(torch.stack([rel, F.cosine_similarity(a, b, dim=1, eps=0.0)], dim=1))
    out = torch.stack(rows, dim=1)  # (S, L, 2)
    return _to_numpy(out, stacked=value.dim() == 1)


def smoothness(
    model: nn.Sequential,
    x: Tensor,
    y: Tensor,
    etas: Sequence[float] = ETAS,
    *,
    loss: LossFn = per_model_cross_entropy,
) -> np.ndarray:
    """Smoothness of the loss along the gradient (equation ``eq-why-smoothness``).

    At the current parameters ``w`` with mini-batch gradient ``g`` (all trainable parameters),
    evaluate the loss and its gradient at ``w − η g`` for every ``η`` in ``etas`` and return

    * the loss range, ``max_η L(w − ηg) − min_η L(w − ηg)``;
    * the gradient predictiveness, ``max_η ‖∇L(w) − ∇L(w − ηg)‖``;
    * the effective smoothness constant, ``max_η ‖∇L(w) − ∇L(w − ηg)‖ / ‖ηg‖``: a lower bound on
      the Lipschitz constant K of the gradient along that line (for a quadratic loss with
      Hessian H it is ``‖Hg‖ / ‖g‖``).

    Parameters
    ----------
    model : nn.Sequential
        The network, in the mode to measure; not changed (the points are evaluated on copies).
    x, y : Tensor
        One mini-batch, as ``loss(model(x), y)`` expects it.
    etas : sequence of float
        Positive step sizes (default :data:`ETAS`, 0.05 to 0.4).
    loss : callable
        ``loss(output, y)``, 0-d or (S,) for S stacked networks (default
        :func:`per_model_cross_entropy`).

    Returns
    -------
    ndarray of float64
        ``[loss range, gradient predictiveness, effective K]``.

    Shape
    -----
    (3,) for one network; (S, 3) for S stacked networks.

    Raises
    ------
    TypeError
        If ``model`` is not an ``nn.Sequential``.
    ValueError
        If ``etas`` is empty or holds a value that is not finite and positive, or if the loss
        has a shape other than () or (S,).

    Examples
    --------
    For least squares the gradient is linear in ``w``, so the effective K is ``‖Hg‖ / ‖g‖`` at
    every step size:

    >>> _ = torch.manual_seed(0)
    >>> net = nn.Sequential(nn.Linear(5, 1, bias=False))
    >>> x, y = torch.randn(32, 5), torch.randn(32, 1)
    >>> half_mse = lambda out, target: 0.5 * ((out - target) ** 2).mean()
    >>> smoothness(net, x, y, etas=(0.1, 0.2), loss=half_mse).shape
    (3,)
    """
    _check_sequential(model)
    etas_arr = np.asarray(list(etas), dtype=np.float64)
    if (
        etas_arr.ndim != 1
        or etas_arr.size == 0
        or not np.all(np.isfinite(etas_arr) & (etas_arr > 0))
    ):
        raise ValueError(f"etas must be a non-empty sequence of positive numbers, got {etas!r}")
    value, grads = loss_and_gradients(copy.deepcopy(model), x, y, loss)
    s = _n_models(value, grads)
    g_flat = _per_model(grads, s)  # (S, P)
    losses, changes = [], []
    for eta in etas_arr:
        moved = copy.deepcopy(model)
        with torch.no_grad():
            for p, g in zip(_trainable(moved), grads, strict=True):
                p.sub_(float(eta) * g)
        value_eta, grads_eta = loss_and_gradients(moved, x, y, loss)
        losses.append(value_eta.reshape(s))
        changes.append((g_flat - _per_model(grads_eta, s)).norm(dim=1))
    losses_t, changes_t = torch.stack(losses), torch.stack(changes)  # (E, S)
    steps = torch.as_tensor(etas_arr, dtype=g_flat.dtype, device=g_flat.device)[:, None]
    k_eff = (changes_t / (steps * g_flat.norm(dim=1))).amax(0)
    out = torch.stack(
        [losses_t.amax(0) - losses_t.amin(0), changes_t.amax(0), k_eff], dim=1
    )  # (S, 3)
    return _to_numpy(out, stacked=value.dim() == 1)


@torch.no_grad()
def precise_bn(model: nn.Module, x: Tensor, batch_size: int | None = None) -> nn.Module:
    """A copy of ``model`` whose running statistics are recomputed at its current weights.

    Every batch-norm layer (``torch.nn.BatchNorm*d``, the package's twins and variants) forgets its
    running statistics and averages, with equal weights (``momentum=None``), the batch statistics
    of ``x`` cut into consecutive batches of ``batch_size`` samples (``None``: all of ``x`` as one
    batch, which gives the exact mean and unbiased variance of ``x`` at every layer). This is the
    population estimate of Ioffe and Szegedy's Algorithm 2 (chapter ``ch-inference``), and the
    re-estimation on new data of chapter ``ch-challenges``. ``model`` itself is left unchanged.

    Parameters
    ----------
    model : nn.Module
        The network; its mode does not matter (the copy is returned in evaluation mode).
    x : Tensor
        Inputs, on the model's device; a trailing incomplete batch is dropped.
    batch_size : int or None
        Samples per batch.

    Returns
    -------
    nn.Module
        The copy, in evaluation mode.

    Raises
    ------
    ValueError
        If ``batch_size`` is not None and not in [2, len(x)].

    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    >>> x = torch.randn(64, 3)
    >>> fresh = precise_bn(net, x)
    >>> h = net[0](x)
    >>> bool(torch.allclose(fresh[1].running_mean, h.mean(0), atol=1e-6))
    True
    >>> bool(torch.allclose(fresh[1].running_var, h.var(0), atol=1e-5))
    True
    """
    n = len(x)
    if batch_size is not None and not 2 <= batch_size <= n:
        raise ValueError(f"batch_size must be None or in [2, len(x) = {n}], got {batch_size!r}")
    step = n if batch_size is None else batch_size
    model = copy.deepcopy(model)
    for layer in model.modules():
        if is_batch_norm(layer):
            layer.reset_running_stats()
            layer.momentum = None  # cumulative average: every batch counts equally
    model.train()
    for start in range(0, n - step + 1, step):
        model(x[start : start + step])
    return model.eval()


def steps_to_target(steps: np.ndarray, acc: np.ndarray, target: float) -> np.ndarray:
    """The first evaluation step at which accuracy reaches ``target`` (``inf`` if never).

    Parameters
    ----------
    steps : ndarray (T,)
    acc : ndarray (..., T)

    Returns
    -------
    ndarray (...,) of float

    Examples
    --------
    >>> steps_to_target(np.array([0, 10, 20]), np.array([[0.1, 0.5, 0.9], [0.1, 0.2, 0.3]]), 0.5)
    array([10., inf])
    """
    acc = np.asarray(acc)
    reached = acc >= target
    first = np.argmax(reached, axis=-1)
    out = np.asarray(steps, dtype=np.float64)[first]
    return np.where(reached.any(axis=-1), out, np.inf)


def largest_trainable(values: Sequence[float], trains: np.ndarray) -> float:
    """The largest value (e.g. a learning rate) at which ``trains`` holds for every seed.

    Parameters
    ----------
    values : sequence (V,)
    trains : bool ndarray (V,) or (V, n_seeds)

    Returns
    -------
    float
        NaN if no value trains.

    Examples
    --------
    >>> largest_trainable([0.1, 1.0, 10.0], np.array([[True, True], [True, False], [False, False]]))
    0.1
    """
    trains = np.asarray(trains, dtype=bool)
    ok = trains.reshape(len(trains), -1).all(axis=1)
    good = np.asarray(values, dtype=np.float64)[ok]
    return float(good.max()) if good.size else float("nan")
