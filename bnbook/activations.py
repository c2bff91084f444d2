"""Looking inside a network: the activations each layer receives, and their percentiles over training.

Chapter ``ch-why`` asks two questions of a network's activations, and this module answers them:

* **How big are the activations in each layer?** :func:`module_inputs` runs a model on a batch and
  returns the input of chosen modules (e.g. of every activation function), optionally with batch
  norm using the batch's own statistics (as in training) without changing the model.
* **How does one unit's input distribution move during training?** :class:`PercentileRecorder`, a
  callback for :func:`bnbook.train.train_classifier`, records chosen percentiles of a module's input
  on a fixed batch at every evaluation point (the experiment behind Figure 1 of Ioffe and Szegedy,
  2015); :func:`percentile_drift` says how far they moved.

>>> import torch
>>> from bnbook.models import mlp
>>> from bnbook.activations import module_inputs, input_percentiles
>>> net = mlp((784, 100, 100, 10), activation="sigmoid")
>>> x = torch.rand(64, 784)
>>> [z.shape for z in module_inputs(net, x, [net[1], net[3]])]   # inputs of the two sigmoids
[torch.Size([64, 100]), torch.Size([64, 100])]
>>> input_percentiles(net, net[3], x).shape                       # (15th, 50th, 85th) x 100 units
(3, 100)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import contextmanager

import numpy as np
import torch
from torch import Tensor, nn

from bnbook.fusion import is_batch_norm
from bnbook.stacked import StackedBatchNorm

__all__ = [
    "module_inputs",
    "input_percentiles",
    "PercentileRecorder",
    "percentile_drift",
]

ModuleSelector = int | nn.Module | Callable[[nn.Module], nn.Module]


def _keeps_running_stats(module: nn.Module) -> bool:
    """A batch norm, by type: :func:`bnbook.fusion.is_batch_norm`, or S stacked ones."""
    return is_batch_norm(module) or isinstance(module, StackedBatchNorm)


@contextmanager
def _batch_statistics(model: nn.Module, enabled: bool):
    """Normalise with the statistics of the current batch, leaving every buffer as it was.

    Batch-norm layers are put in training mode (so they use the batch's mean and variance, as they
    do during training); their running statistics are saved before and restored after, so looking
    does not change the model. Every other module keeps its mode (dropout stays off in eval mode).
    """
    norms = [m for m in model.modules() if _keeps_running_stats(m)] if enabled else []
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
