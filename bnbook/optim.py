"""SGD and Adam with one learning rate per network, for the stacked networks of :mod:`bnbook.stacked`.

``S`` networks stacked into one (every parameter laid out network-major: ``(S, ...)`` or
``(S·C,)``) each need their own learning rate in a sweep. :class:`StackedSGD` and
:class:`StackedAdam` apply PyTorch's update rules element by element, with the learning rate of the
network the element belongs to; with equal learning rates they equal ``torch.optim.SGD`` and
``torch.optim.Adam`` (``tests/test_optim.py``). They are what :func:`bnbook.train.train_stacked`
steps with, and they are plain objects with ``zero_grad`` and ``step``, as :func:`bnbook.train.fit`
expects of any optimiser.

>>> import torch
>>> w = torch.nn.Parameter(torch.ones(3, 2))           # three networks, two weights each
>>> opt = StackedSGD([w], lr=[0.1, 0.2, 0.3])
>>> w.sum().backward()
>>> opt.step()
>>> w.detach()[:, 0]
tensor([0.9000, 0.8000, 0.7000])
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = ["StackedSGD", "StackedAdam"]


class _PerNetwork:
    """Parameters with one learning rate per network, laid out like each parameter."""

    def __init__(self, params: Iterable[Tensor], lr: float | Sequence[float], n_models: int | None):
        self.params = [p for p in params if p.requires_grad]
        lr_arr = np.asarray(lr, dtype=np.float64)
        s = n_models if n_models is not None else max(lr_arr.size, 1)
        if lr_arr.ndim == 0:
            lr_arr = np.full(s, float(lr_arr))
        if lr_arr.shape != (s,):
            raise ValueError(f"lr must be a float or S = {s} floats, got shape {lr_arr.shape}")
        for p in self.params:
            if p.numel() % s:
                raise ValueError(
                    f"a parameter of shape {tuple(p.shape)} does not split into S = {s} networks"
                )
        self.n_models = s
        device = self.params[0].device if self.params else None
        # every parameter is network-major, so an (S, 1) column broadcasts over its rows
        column = torch.tensor(lr_arr, dtype=torch.float32, device=device)[:, None]
        self.lrs = [
            column.expand(s, p.numel() // s).reshape(p.shape).contiguous() for p in self.params
        ]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None


class StackedSGD(_PerNetwork):
    """SGD with optional momentum (PyTorch's rule: ``v ← μv + g``, ``p ← p − lr·v``), per network.

    Parameters
    ----------
    params : iterable of Tensor
        Network-major parameters of S stacked networks.
    lr : float or sequence of S floats
    momentum : float
    n_models : int or None
        S; None: the length of ``lr`` (1 for a float).

    Raises
    ------
    ValueError
        ``lr`` of a length other than S, or a parameter that does not split into S parts.
    """

    def __init__(
        self,
        params: Iterable[Tensor],
        lr: float | Sequence[float],
        *,
        momentum: float = 0.0,
        n_models: int | None = None,
    ) -> None:
        super().__init__(params, lr, n_models)
        self.momentum = momentum
        self.velocity = [torch.zeros_like(p) for p in self.params] if momentum else []

    @torch.no_grad()
    def step(self) -> None:
        grads = [p.grad for p in self.params]
        if self.momentum:
            torch._foreach_mul_(self.velocity, self.momentum)
            torch._foreach_add_(self.velocity, grads)
            grads = self.velocity
        torch._foreach_addcmul_(self.params, grads, self.lrs, value=-1.0)


class StackedAdam(_PerNetwork):
    """Adam (PyTorch's formula, bias-corrected moments) with one learning rate per network.

    Parameters
    ----------
    params, lr, n_models
        As in :class:`StackedSGD`.
    betas : (float, float)
    eps : float

    Raises
    ------
    ValueError
        As :class:`StackedSGD`.
    """

    def __init__(
        self,
        params: Iterable[Tensor],
        lr: float | Sequence[float],
        *,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        n_models: int | None = None,
    ) -> None:
        super().__init__(params, lr, n_models)
        self.betas, self.eps, self.steps = betas, eps, 0
        self.m1 = [torch.zeros_like(p) for p in self.params]
        self.m2 = [torch.zeros_like(p) for p in self.params]
        self.scratch = [torch.zeros_like(p) for p in self.params]

    @torch.no_grad()
    def step(self) -> None:
        b1, b2 = self.betas
        grads = [p.grad for p in self.params]
        self.steps += 1
        torch._foreach_lerp_(self.m1, grads, 1 - b1)  # first moment m
        torch._foreach_mul_(self.m2, b2)  # second moment v
        torch._foreach_addcmul_(self.m2, grads, grads, value=1 - b2)
        bias1, bias2 = 1 - b1**self.steps, 1 - b2**self.steps
        # p ← p − lr/bias1 · m / (sqrt(v / bias2) + eps), in place on preallocated buffers
        torch._foreach_copy_(self.scratch, self.m2)
        torch._foreach_sqrt_(self.scratch)
        torch._foreach_mul_(self.scratch, 1.0 / math.sqrt(bias2))
        torch._foreach_add_(self.scratch, self.eps)
        torch._foreach_div_(self.scratch, self.lrs)
        torch._foreach_addcdiv_(self.params, self.m1, self.scratch, value=-1.0 / bias1)
