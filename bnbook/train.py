"""A small, explicit training loop for the chapters' experiments.

>>> import bnbook
>>> from bnbook.data import load_mnist_subset
>>> from bnbook.models import mlp
>>> from bnbook.train import train_classifier
>>> bnbook.seed_everything(0)
>>> hist = train_classifier(mlp((784, 32, 10)), load_mnist_subset(), steps=50, eval_every=25)
>>> hist.steps
[0, 25, 50]
>>> 0.0 <= hist.eval_acc[-1] <= 1.0
True
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from bnbook import seed as run_seed

__all__ = ["History", "batches", "evaluate", "train_classifier", "as_tensors"]


@dataclass
class History:
    """What :func:`train_classifier` records at each evaluation point."""

    steps: list[int] = field(default_factory=list)
    train_loss: list[float] = field(
        default_factory=list
    )  #: mean training loss since the last point
    eval_loss: list[float] = field(default_factory=list)
    eval_acc: list[float] = field(default_factory=list)
    diverged: bool = False  #: the training loss became NaN or infinite; training stopped there

    @property
    def final_acc(self) -> float:
        return self.eval_acc[-1]

    def steps_to(self, accuracy: float) -> int | None:
        """First recorded step whose evaluation accuracy reaches ``accuracy``, or None."""
        for step, acc in zip(self.steps, self.eval_acc, strict=True):
            if acc >= accuracy:
                return step
        return None


def batches(n: int, batch_size: int, *, seed: int) -> Iterator[np.ndarray]:
    """Endless mini-batches of indices into ``range(n)``, reshuffled every epoch with ``seed``.

    The last incomplete batch of an epoch is dropped, so every batch has ``batch_size`` indices.
    """
    if not 1 <= batch_size <= n:
        raise ValueError(f"batch_size must be in [1, {n}], got {batch_size}")
    rng = np.random.default_rng(seed)
    while True:
        order = rng.permutation(n)
        for start in range(0, n - batch_size + 1, batch_size):
            yield order[start : start + batch_size]


def as_tensors(data, split: str, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, y)`` of split ``"train"``, ``"val"`` or ``"test"`` of an MNISTSplits, as tensors on ``device``."""
    if split not in ("train", "val", "test"):
        raise ValueError(f"split must be 'train', 'val' or 'test', got {split!r}")
    x, y = getattr(data, f"x_{split}"), getattr(data, f"y_{split}")
    return torch.as_tensor(x, device=device), torch.as_tensor(y, device=device)


@torch.no_grad()
def evaluate(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000
) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` on ``(x, y)``, in evaluation mode.

    The model's previous mode (train or eval) is restored afterwards.
    """
    was_training = model.training
    model.eval()
    total_loss, correct = 0.0, 0
    try:
        for start in range(0, len(x), batch_size):
            logits = model(x[start : start + batch_size])
            target = y[start : start + batch_size]
            total_loss += F.cross_entropy(logits, target, reduction="sum").item()
            correct += (logits.argmax(1) == target).sum().item()
    finally:
        model.train(was_training)
    return total_loss / len(x), correct / len(x)


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
    """Train ``model`` with cross-entropy on mini-batches of ``data``'s training split.

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
    if seed is None:
        seed = run_seed(0)
    model.to(device).train()
    x_train, y_train = as_tensors(data, "train", device)
    x_eval, y_eval = as_tensors(data, eval_split, device)
    opt = _optimizer(model, optimizer, lr, momentum)
    history = History()
    running, count = 0.0, 0

    def record(step: int) -> None:
        nonlocal running, count
        loss, acc = evaluate(model, x_eval, y_eval)
        history.steps.append(step)
        history.train_loss.append(running / count if count else math.nan)
        history.eval_loss.append(loss)
        history.eval_acc.append(acc)
        running, count = 0.0, 0
        if callback is not None:
            callback(step, model)

    if eval_every:
        record(0)
    order = batches(len(x_train), batch_size, seed=seed)
    for step in range(1, steps + 1):
        idx = torch.from_numpy(next(order)).to(device)
        loss = F.cross_entropy(model(x_train[idx]), y_train[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        value = loss.item()
        if not math.isfinite(value):
            history.diverged = True
            running, count = value, 1
            record(step)
            return history
        running += value
        count += 1
        if (eval_every and step % eval_every == 0) or step == steps:
            if not history.steps or history.steps[-1] != step:
                record(step)
    if not history.steps:
        record(0)
    return history
