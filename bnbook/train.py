"""Training: one batch sampler, one history, one loop that takes a batch source.

Every experiment of the book trains through :func:`fit`: it draws a batch from a source, takes one
optimiser step on the sum of the per-network losses, and at chosen steps evaluates. What varies
between experiments is given to it, not written again:

* the **batch source**, an iterator of ``(x, y)``: :func:`sample` draws mini-batches with
  :func:`batches` (one seeded order of epochs per network), for one network or for ``S`` stacked
  networks at once (:mod:`bnbook.stacked`);
* the **optimiser**: ``torch.optim`` for one network, :class:`bnbook.optim.StackedSGD` /
  :class:`bnbook.optim.StackedAdam` for one learning rate per stacked network;
* the **loss** (per network: a 0-d tensor, or shape ``(S,)``), the **evaluation** and a hook run
  **before each step** (e.g. gradient clipping).

It returns a :class:`History`. The chapters call the entry points built on it:
:func:`train_classifier` (one network), :func:`train_stacked` (``S`` networks of
:func:`bnbook.stacked.stacked_mlp` in one, each on its own batches) and :func:`train_family` (the
CNN comparison of chapter ``ch-family``).

>>> import bnbook
>>> from bnbook.data import load_mnist_subset
>>> from bnbook.models import mlp
>>> bnbook.seed_everything(0)
>>> hist = train_classifier(mlp((784, 32, 10)), load_mnist_subset(), steps=50, eval_every=25)
>>> hist.steps
array([ 0, 25, 50])
>>> bool(0.0 <= hist.final_acc <= 1.0)
True
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import islice

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bnbook import seed as run_seed
from bnbook.measure import LossFn, per_model_cross_entropy, steps_to_target

__all__ = [
    "History",
    "batches",
    "batch_indices",
    "sample",
    "eval_steps",
    "as_tensors",
    "evaluate",
    "fit",
    "train_classifier",
    "train_stacked",
    "train_family",
]

Batch = tuple[Tensor, Tensor]


# --------------------------------------------------------------------------------------------
# The batch sampler
# --------------------------------------------------------------------------------------------


def batches(n: int, batch_size: int, *, seed: int) -> Iterator[np.ndarray]:
    """Endless mini-batches of indices into ``range(n)``, reshuffled every epoch with ``seed``.

    Each epoch is one permutation drawn from ``numpy.random.default_rng(seed)``; its last
    incomplete batch is dropped, so every batch has ``batch_size`` indices.

    Raises
    ------
    ValueError
        ``batch_size`` outside ``[1, n]``.

    Examples
    --------
    >>> order = batches(10, 4, seed=0)
    >>> next(order).shape
    (4,)
    """
    if not 1 <= batch_size <= n:
        raise ValueError(f"batch_size must be in [1, n] = [1, {n}], got {batch_size}")
    rng = np.random.default_rng(seed)
    while True:
        order = rng.permutation(n)
        for start in range(0, n - batch_size + 1, batch_size):
            yield order[start : start + batch_size]


def batch_indices(n: int, batch_size: int, steps: int, seeds: Sequence[int]) -> np.ndarray:
    """The first ``steps`` batches of :func:`batches` for each seed, as one array.

    Returns
    -------
    ndarray of int64, shape (steps, S, batch_size)

    Examples
    --------
    >>> batch_indices(10, 4, 3, seeds=[0, 1]).shape
    (3, 2, 4)
    """
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    out = np.empty((steps, len(seeds), batch_size), dtype=np.int64)
    for j, seed in enumerate(seeds):
        order = batches(n, batch_size, seed=seed)
        for t, idx in enumerate(islice(order, steps)):
            out[t, j] = idx
    if steps == 0:  # still check the batch size
        for seed in seeds:
            next(batches(n, batch_size, seed=seed))
    return out


def sample(x: Tensor, y: Tensor, batch_size: int, *, seeds: int | Sequence[int]) -> Iterator[Batch]:
    """Endless mini-batches ``(x[idx], y[idx])`` with the indices of :func:`batches`.

    Parameters
    ----------
    x, y : Tensor (n, ...), (n,)
    batch_size : int
    seeds : int or sequence of S ints
        One seed: batches of one network, shapes (B, ...) and (B,). A sequence: one batch per
        network and seed, stacked, shapes (S, B, ...) and (S, B).

    Examples
    --------
    >>> xb, yb = next(sample(torch.zeros(10, 3), torch.zeros(10), 4, seeds=[0, 1]))
    >>> xb.shape, yb.shape
    (torch.Size([2, 4, 3]), torch.Size([2, 4]))
    """
    if isinstance(seeds, int | np.integer):
        for idx in batches(len(x), batch_size, seed=int(seeds)):
            i = torch.from_numpy(idx).to(x.device)
            yield _rows(x, i), _rows(y, i)
        return
    orders = [batches(len(x), batch_size, seed=s) for s in seeds]
    while True:
        i = torch.from_numpy(np.stack([next(o) for o in orders])).to(x.device)  # (S, B)
        yield _rows(x, i), _rows(y, i)


def _rows(t: Tensor, idx: Tensor) -> Tensor:
    """``t[idx]`` for an index tensor ``idx`` of any shape: the same values, gathered with
    ``index_select`` (a row copy each), several times faster than indexing with a 2-D tensor."""
    return t.index_select(0, idx.reshape(-1)).view(*idx.shape, *t.shape[1:])


def eval_steps(steps: int, every: int | None, *, start: bool = True) -> set[int]:
    """Steps at which to evaluate: 0 (if ``start``), every ``every`` steps, and the last.

    >>> sorted(eval_steps(10, 4))
    [0, 4, 8, 10]
    >>> sorted(eval_steps(10, None, start=False))
    [10]
    """
    at = set(range(0, steps + 1, every)) if every else set()
    if start:
        at.add(0)
    at.add(steps)
    return at


def as_tensors(data, split: str, device=None) -> tuple[Tensor, Tensor]:
    """``(x, y)`` of split ``"train"``, ``"val"`` or ``"test"`` of an MNISTSplits, as tensors."""
    if split not in ("train", "val", "test"):
        raise ValueError(f"split must be 'train', 'val' or 'test', got {split!r}")
    x, y = getattr(data, f"x_{split}"), getattr(data, f"y_{split}")
    return torch.as_tensor(x, device=device), torch.as_tensor(y, device=device)


# --------------------------------------------------------------------------------------------
# Evaluation and the history
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 1000):
    """Mean cross-entropy and accuracy of ``model`` on ``(x, y)``, in evaluation mode.

    The model's previous mode is restored afterwards. ``x`` is fed in chunks of ``batch_size``.

    Parameters
    ----------
    model : nn.Module
        One network (logits (M, K)) or S stacked networks (logits (S, M, K)).
    x : Tensor (M, ...), shared by stacked networks, or (S, M, ...), one input per network
    y : Tensor (M,)

    Returns
    -------
    loss, accuracy : float, float for one network; ndarray (S,) each for S stacked networks
    """
    was_training = model.training
    model.eval()
    losses, hits = [], []
    try:
        # the samples' axis: 0 for a shared input, 1 for one input per stacked network
        axis = 0 if x.shape[0] == len(y) else 1
        for start in range(0, len(y), batch_size):
            chunk = x.narrow(axis, start, min(batch_size, len(y) - start))
            logits, target = model(chunk), y[start : start + batch_size]
            k = logits.shape[-1]
            loss = F.cross_entropy(
                logits.reshape(-1, k),
                target.expand(logits.shape[:-1]).reshape(-1),
                reduction="none",
            )
            losses.append(loss.view(logits.shape[:-1]).double())
            hits.append((logits.argmax(-1) == target).double())
    finally:
        model.train(was_training)
    loss_m = torch.cat(losses, dim=-1).mean(-1).cpu().numpy()
    acc_m = torch.cat(hits, dim=-1).mean(-1).cpu().numpy()
    if loss_m.ndim == 0:
        return float(loss_m), float(acc_m)
    return loss_m, acc_m


@dataclass
class History:
    """What :func:`fit` records.

    Every loss and accuracy has a trailing time axis, and a leading network axis (S, ...) when the
    loss is one value per network (stacked networks).

    Attributes
    ----------
    steps : ndarray (T,)
        Optimisation steps at which the model was evaluated (0 = before training).
    train_loss : ndarray (T,) or (S, T)
        Mean mini-batch loss (training mode) over the steps since the previous evaluation point;
        NaN at step 0.
    eval_loss, eval_acc : ndarray (T,) or (S, T)
        Loss and accuracy on the evaluation data, in evaluation mode.
    batch_loss : ndarray (steps,) or (S, steps)
        Every step's mini-batch loss.
    diverged : bool or ndarray (S,) of bool
        The mini-batch loss became NaN or infinite, or exceeded ``diverge_loss``.
    """

    steps: np.ndarray
    train_loss: np.ndarray
    eval_loss: np.ndarray
    eval_acc: np.ndarray
    batch_loss: np.ndarray
    diverged: bool | np.ndarray

    @property
    def final_acc(self) -> float | np.ndarray:
        """Accuracy at the last evaluation point (one per network)."""
        return self.eval_acc[..., -1]

    @property
    def final_loss(self) -> float | np.ndarray:
        """Evaluation loss at the last evaluation point (one per network)."""
        return self.eval_loss[..., -1]

    def steps_to(self, accuracy: float) -> float | np.ndarray:
        """First evaluation step whose accuracy reaches ``accuracy`` (``inf`` if never)."""
        out = steps_to_target(self.steps, self.eval_acc, accuracy)
        return float(out) if out.ndim == 0 else out


def _history(rows: dict[str, list], batch_loss: list, diverged: np.ndarray) -> History:
    shape = np.shape(rows["eval_loss"][0]) if rows["eval_loss"] else np.shape(diverged)

    def stack(values: list) -> np.ndarray:
        if not values:
            return np.empty((*shape, 0))
        return np.stack(
            [np.broadcast_to(np.asarray(v, dtype=np.float64), shape) for v in values], -1
        )

    return History(
        steps=np.asarray(rows["steps"], dtype=np.int64),
        train_loss=stack(rows["train_loss"]),
        eval_loss=stack(rows["eval_loss"]),
        eval_acc=stack(rows["eval_acc"]),
        batch_loss=stack(batch_loss),
        diverged=bool(diverged) if shape == () else np.broadcast_to(diverged, shape).copy(),
    )


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------


def fit(
    model: nn.Module,
    source: Iterable[Batch],
    optimizer,
    *,
    steps: int,
    loss: LossFn = per_model_cross_entropy,
    evaluate: Callable[[nn.Module], tuple] | None = None,
    eval_at: Collection[int] = (),
    callback: Callable[[int, nn.Module], None] | None = None,
    before_step: Callable[[nn.Module], None] | None = None,
    diverge_loss: float = math.inf,
    stop_on_divergence: bool = False,
) -> History:
    """Train ``model`` for ``steps`` steps on batches from ``source``: the book's one training loop.

    Each step: ``(x, y) = next(source)``; ``losses = loss(model(x), y)`` (0-d, or (S,) for S
    stacked networks); ``optimizer.zero_grad()``; ``losses.sum().backward()`` (each stacked network
    gets the gradient of its own loss); ``before_step(model)``; ``optimizer.step()``.

    Parameters
    ----------
    model : nn.Module
        Trained in place, in training mode (left in it).
    source : iterable of (x, y)
        E.g. :func:`sample`; at least ``steps`` batches.
    optimizer
        Anything with ``zero_grad(set_to_none=True)`` and ``step()``.
    steps : int
    loss : callable
        ``loss(output, y)`` → per-network losses.
    evaluate : callable or None
        ``evaluate(model)`` → ``(loss, accuracy)`` (floats, or (S,) arrays), at each step of
        ``eval_at`` (step t: after t updates).
    eval_at : collection of int
        See :func:`eval_steps`.
    callback : callable or None
        ``callback(step, model)`` at each evaluation point, after the evaluation; it must leave
        the model as it found it.
    before_step : callable or None
        ``before_step(model)`` after the backward pass, before the update (e.g. clipping).
    diverge_loss : float
        A mini-batch loss above this, or not finite, marks its network as diverged.
    stop_on_divergence : bool
        Stop once every network has diverged, recording that step.

    Returns
    -------
    History
    """
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    if eval_at and evaluate is None:
        raise ValueError("eval_at needs an evaluate function")
    rows: dict[str, list] = {"steps": [], "train_loss": [], "eval_loss": [], "eval_acc": []}
    batch_loss: list[np.ndarray] = []
    running, count = np.float64(0.0), 0
    diverged = np.zeros((), dtype=bool)

    def record(t: int) -> None:
        nonlocal running, count
        eval_loss, eval_acc = evaluate(model)
        rows["steps"].append(t)
        rows["train_loss"].append(running / count if count else np.nan)
        rows["eval_loss"].append(eval_loss)
        rows["eval_acc"].append(eval_acc)
        running, count = np.float64(0.0), 0
        if callback is not None:
            callback(t, model)

    model.train()
    batches_ = iter(source)
    for t in range(steps + 1):
        if t in eval_at:
            record(t)
        if t == steps:
            break
        x, y = next(batches_)
        losses = loss(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        losses.sum().backward()
        if before_step is not None:
            before_step(model)
        optimizer.step()
        values = losses.detach().cpu().numpy().astype(np.float64)
        batch_loss.append(values)
        diverged = diverged | ~np.isfinite(values) | (values > diverge_loss)
        if stop_on_divergence and diverged.all():
            running, count = values, 1
            if evaluate is not None:
                record(t + 1)
            break
        running = running + values
        count += 1
    return _history(rows, batch_loss, diverged)


# --------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------


def _optimizer(model: nn.Module, optimizer, lr: float, momentum: float) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if callable(optimizer) and not isinstance(optimizer, str):
        return optimizer(params)
    if optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum)
    if optimizer == "adam":
        return torch.optim.Adam(params, lr=lr)
    raise ValueError(
        f"optimizer must be 'sgd', 'adam' or a callable params -> Optimizer, got {optimizer!r}"
    )


def train_classifier(
    model: nn.Module,
    data,
    *,
    steps: int,
    batch_size: int = 60,
    lr: float = 0.1,
    optimizer: str | Callable = "sgd",
    momentum: float = 0.0,
    seed: int | None = None,
    eval_every: int | None = None,
    eval_split: str = "test",
    callback: Callable[[int, nn.Module], None] | None = None,
    device=None,
) -> History:
    """Train one network with cross-entropy on mini-batches of ``data``'s training split.

    Parameters
    ----------
    model : nn.Module
        Maps a batch of ``data.x_train`` rows to logits; trained in place.
    data : MNISTSplits
        From :func:`bnbook.data.load_mnist_subset` (NumPy or torch).
    steps : int
        Optimisation steps (mini-batches).
    batch_size, lr, momentum : int, float, float
        Mini-batch size, learning rate, SGD momentum.
    optimizer : {"sgd", "adam"} or callable
        Or ``params -> torch.optim.Optimizer``.
    seed : int or None
        Seeds the batch order (the model's initialisation is the caller's business); None takes
        the run's :func:`bnbook.seed` ``(0)``.
    eval_every : int or None
        Evaluate on ``eval_split`` at step 0, every ``eval_every`` steps and at the end; None: only at
        the end.
    eval_split : {"test", "val", "train"}
    callback : callable or None
        ``callback(step, model)`` at every evaluation point (the model is in training mode).
    device : torch.device or None
        Where to train; None keeps the model where it is (a new model is on the CPU). Pass
        :func:`bnbook.default_device` to use a GPU when there is one; the model stays there.

    Returns
    -------
    History
        Training stops early, with ``diverged=True``, if the training loss is not finite.
    """
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    if device is None:
        device = next(model.parameters(), torch.empty(0)).device
    model.to(device)
    x_train, y_train = as_tensors(data, "train", device)
    x_eval, y_eval = as_tensors(data, eval_split, device)
    return fit(
        model,
        sample(x_train, y_train, batch_size, seeds=run_seed(0) if seed is None else seed),
        _optimizer(model, optimizer, lr, momentum),
        steps=steps,
        evaluate=lambda m: evaluate(m, x_eval, y_eval),
        eval_at=eval_steps(steps, eval_every, start=bool(eval_every)),
        callback=callback,
        stop_on_divergence=True,
    )


def train_stacked(
    model: nn.Module,
    x_train: Tensor,
    y_train: Tensor,
    x_eval: Tensor,
    y_eval: Tensor,
    *,
    steps: int,
    lr: float | Sequence[float],
    seeds: Sequence[int],
    batch_size: int = 60,
    optimizer: str = "sgd",
    momentum: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
    adam_eps: float = 1e-8,
    eval_every: int | None = None,
    diverge_loss: float = 1e3,
    callback: Callable[[int, nn.Module], None] | None = None,
    before_step: Callable[[nn.Module], None] | None = None,
) -> History:
    """Train the ``S`` networks of a :func:`bnbook.stacked.stacked_mlp` side by side.

    Network ``s`` draws its own mini-batches (:func:`sample` with ``seeds[s]``) and has its own
    learning rate ``lr[s]`` (:class:`bnbook.optim.StackedSGD` or :class:`bnbook.optim.StackedAdam`,
    PyTorch's update rules); the loss is the sum of the networks' mean cross-entropies.

    Parameters
    ----------
    model : nn.Module
        S stacked networks (every parameter network-major); trained in place.
    x_train, y_train : Tensor (n, d), (n,)
        Training data, shared by all networks (each draws its own mini-batches).
    x_eval, y_eval : Tensor (m, d), (m,)
        Evaluation data, used whole at every evaluation point.
    steps : int
    lr : float or sequence of S floats
    seeds : sequence of S ints
        Seed of each network's mini-batch order. The initial weights come from torch's global
        generator when the model is built: seed it before :func:`bnbook.stacked.stacked_mlp`.
    batch_size : int
        Mini-batch size (default 60, as in the MNIST experiment of :cite:t:`ioffe2015batch`).
    optimizer : {"sgd", "adam"}
        SGD (with optional ``momentum``) or Adam with ``betas`` and ``adam_eps``.
    eval_every : int or None
        Evaluate at step 0, every ``eval_every`` steps, and at the end (default: 0 and end only).
    diverge_loss : float
        A network whose mini-batch loss exceeds this, or is not finite, counts as diverged.
    callback : callable or None
        ``callback(step, model)`` at every evaluation point, after the evaluation.
    before_step : callable or None
        ``before_step(model)`` after each backward pass, before the update (e.g. clipping).

    Returns
    -------
    History
        Losses and accuracies of shape (S, T).

    Raises
    ------
    ValueError
        ``lr`` or ``seeds`` of a length other than S, or an unknown ``optimizer``.
    """
    from bnbook.optim import StackedAdam, StackedSGD  # noqa: PLC0415 (optim imports nothing)
    from bnbook.stacked import n_models  # noqa: PLC0415 (stacked imports models, not train)

    s = n_models(model)
    seeds = list(seeds)
    if len(seeds) != s:
        raise ValueError(f"seeds must have one entry per network (S = {s}), got {len(seeds)}")
    params = model.parameters()
    if optimizer == "sgd":
        opt = StackedSGD(params, lr, momentum=momentum, n_models=s)
    elif optimizer == "adam":
        opt = StackedAdam(params, lr, betas=betas, eps=adam_eps, n_models=s)
    else:
        raise ValueError(f"optimizer must be 'sgd' or 'adam', got {optimizer!r}")
    return fit(
        model,
        sample(x_train, y_train, batch_size, seeds=seeds),
        opt,
        steps=steps,
        evaluate=lambda m: evaluate(m, x_eval, y_eval, batch_size=max(len(y_eval), 1)),
        eval_at=eval_steps(steps, eval_every),
        callback=callback,
        before_step=before_step,
        diverge_loss=diverge_loss,
    )


def train_family(
    method: str,
    batch_size: int,
    x_train: Tensor,
    y_train: Tensor,
    x_test: Tensor,
    y_test: Tensor,
    *,
    seeds: Sequence[int] = (0, 1, 2),
    steps: int = 60,
    lr: float = 3e-3,
) -> np.ndarray:
    """Train one :func:`bnbook.models.family_cnn` per seed (all at once) with Adam.

    Network s starts from its own slice of one random initialisation (``torch.manual_seed(seeds[0])``)
    and draws its mini-batches with :func:`batches` (seed ``seeds[s]``). The loss is the sum of the
    networks' mean cross-entropies, so each network's gradient is that of its own loss, and Adam
    updates every element independently.

    Parameters
    ----------
    x_train, x_test : Tensor (n, 1, 14, 14)
    y_train, y_test : Tensor (n,)

    Returns
    -------
    ndarray (S,)
        Each network's test accuracy.
    """
    from bnbook.models import family_cnn  # noqa: PLC0415

    s = len(seeds)
    torch.manual_seed(seeds[0])
    net = family_cnn(method, seeds=s, batch_size=batch_size, steps=steps)
    # the network takes (N, S, 14, 14), network s's images in channel s, and gives (N, S, 10)
    source = (
        (x[:, :, 0].transpose(0, 1).contiguous(), y)
        for x, y in sample(x_train, y_train, batch_size, seeds=list(seeds))
    )
    history = fit(
        net,
        source,
        torch.optim.Adam(net.parameters(), lr=lr),
        steps=steps,
        loss=lambda logits, y: per_model_cross_entropy(logits.transpose(0, 1), y),
        evaluate=lambda m: evaluate(_NetworkMajor(m, s), x_test, y_test, batch_size=len(x_test)),
        eval_at={steps},
    )
    return history.final_acc


class _NetworkMajor(nn.Module):
    """A family CNN seen as S stacked networks: (M, 1, 14, 14) shared → (S, M, 10)."""

    def __init__(self, net: nn.Module, s: int) -> None:
        super().__init__()
        self.net, self.s = net, s

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x.expand(-1, self.s, -1, -1)).transpose(0, 1)
