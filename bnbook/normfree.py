"""Residual networks without normalisation layers (chapter ``ch-beyond``).

Three ways to train a deep residual network, compared in the chapter on one small residual MLP:

* **batch norm**: pre-activation residual blocks ``h + W₂ ReLU(BN(W₁ ReLU(BN(h))))``
  (:cite:t:`he2016deep`);
* **SkipInit** (:cite:t:`de2020batch`): the same blocks without batch norm, each residual branch
  multiplied by a learned scalar θ initialised to 0, so that at initialisation every block is the
  identity, which is what batch norm does to a residual network in effect;
* **NF** (:cite:t:`brock2021characterizing`, :cite:t:`brock2021high`): *scaled weight
  standardisation* of every weight (:func:`scaled_ws`), blocks ``h + ρ·θ·f(h/τ)`` whose
  signal variance is tracked analytically, and *adaptive gradient clipping*
  (:func:`adaptive_grad_clip_`) during training. The papers write α for ρ and β for τ; in this
  book α is a moving average's momentum and β batch norm's shift.

Like :mod:`bnbook.stacked`, every network here holds ``n_models`` independent copies with a
leading axis on every parameter, so several seeds (or learning rates) train as one.

>>> import torch
>>> net = ResidualMLP("nf", n_models=2, width=16, depth=2)
>>> net(torch.zeros(5, 784)).shape          # (models, samples, classes)
torch.Size([2, 5, 10])
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bnbook.stacked import StackedBatchNorm, StackedLinear
from bnbook.train import History, train_stacked

__all__ = [
    "VARIANTS",
    "RELU_GAIN",
    "scaled_ws",
    "StackedWSLinear",
    "unitwise_norm",
    "adaptive_grad_clip_",
    "ResidualMLP",
    "train_residual",
]

#: The three networks :class:`ResidualMLP` builds.
VARIANTS: tuple[str, ...] = ("batch", "skipinit", "nf")

#: κ = sqrt(2 / (1 − 1/π)): for z ~ N(0, 1), Var(κ·ReLU(z)) = 1, so a standardised linear layer
#: after κ·ReLU keeps unit variance (equation ``eq-beyond-relu-gain``).
RELU_GAIN: float = math.sqrt(2.0 / (1.0 - 1.0 / math.pi))


def scaled_ws(
    weight: Tensor,
    gain: Tensor | None = None,
    act_gain: float = 1.0,
    eps: float = 1e-4,
    *,
    stacked: bool = False,
) -> Tensor:
    """Scaled weight standardisation: ``gain · κ · (W − mean) / sqrt(var · fan_in + ε)``.

    Every output unit's weights (a row, for PyTorch's ``(out, in, ...)`` layout: all dims but 0)
    are standardised to mean 0 and variance 1 and scaled by ``κ/sqrt(fan_in)`` (equation
    ``eq-beyond-ws``): a unit then has the variance of its input times κ², at initialisation and
    throughout training, whatever the weights. :cite:t:`qiao2019micro` introduced the
    standardisation, :cite:t:`brock2021characterizing` the scaling and the gain κ of the
    activation in front (they call it γ; in this book γ is batch norm's scale).

    The standardisation is layer norm applied to the weights, each unit's fan-in in place of a
    token's features; it runs on PyTorch's fused ``layer_norm`` kernel (as the batch-norm network
    it is compared with runs on PyTorch's ``batch_norm``), and ``tests/test_normfree.py`` checks it
    against :func:`bnbook.norms.standardize`.

    Parameters
    ----------
    weight : Tensor (out, in, ...), or (S, out, in, ...) with ``stacked=True``
        Every dim after the output dim is the fan-in.
    gain : Tensor or None
        A learned per-unit gain broadcastable to ``weight`` (None: 1).
    act_gain : float
        κ, the gain of the activation in front (:data:`RELU_GAIN` after a ReLU, 1 after none).
    eps : float
        Added to ``var · fan_in`` (as in :cite:t:`brock2021high`'s code): a unit whose weights are
        all nearly equal is scaled up by at most ``1/sqrt(ε)``.
    stacked : bool
        Dim 0 indexes independent models (:class:`StackedWSLinear`).

    Returns
    -------
    Tensor, the shape of ``weight``

    >>> w = scaled_ws(torch.randn(4, 9) * 3 + 1)
    >>> w.mean(1).abs().max() < 1e-6, torch.allclose(w.pow(2).sum(1), torch.ones(4), atol=1e-4)
    (tensor(True), True)
    """
    first = 2 if stacked else 1
    if weight.dim() <= first:
        raise ValueError(
            f"weight must have an output dim and at least one fan-in dim, got shape "
            f"{tuple(weight.shape)} (stacked={stacked})"
        )
    fan_in = math.prod(weight.shape[first:])
    scale = act_gain / math.sqrt(fan_in)
    w_hat = F.layer_norm(weight, weight.shape[first:], eps=eps / fan_in)  # mean 0, variance 1
    return w_hat * scale if gain is None else w_hat * (gain * scale)


class StackedWSLinear(nn.Module):
    """``n_models`` linear layers with scaled weight standardisation (:func:`scaled_ws`).

    Parameters
    ----------
    n_models, in_features, out_features : int
    act_gain : float
        κ, the gain of the activation in front (:data:`RELU_GAIN` after a ReLU).

    Shape
    -----
    Input (S, N, in_features) or (N, in_features); output (S, N, out_features). ``weight``
    (S, out, in) drawn from N(0, 1/in_features), ``gain`` (S, out, 1) initialised to 1, ``bias``
    (S, 1, out) initialised to 0.
    """

    def __init__(
        self, n_models: int, in_features: int, out_features: int, act_gain: float = 1.0
    ) -> None:
        super().__init__()
        self.n_models, self.in_features, self.out_features = n_models, in_features, out_features
        self.act_gain = float(act_gain)
        # Standardisation removes the scale of the raw weights, but not from their gradient: raw
        # weights of variance 1/fan_in give the standardised ones the learning rate they would
        # have without it (the update of Ŵ is the update of W divided by std(W)·sqrt(fan_in)).
        std = 1.0 / math.sqrt(in_features)
        self.weight = nn.Parameter(torch.randn(n_models, out_features, in_features) * std)
        self.gain = nn.Parameter(torch.ones(n_models, out_features, 1))
        self.bias = nn.Parameter(torch.zeros(n_models, 1, out_features))

    def standardized_weight(self) -> Tensor:
        return scaled_ws(self.weight, self.gain, self.act_gain, stacked=True)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 2:
            x = x.expand(self.n_models, *x.shape)
        return torch.baddbmm(self.bias, x, self.standardized_weight().transpose(1, 2))

    def extra_repr(self) -> str:
        return (
            f"n_models={self.n_models}, in_features={self.in_features}, "
            f"out_features={self.out_features}, act_gain={self.act_gain:.4f}"
        )


def unitwise_norm(x: Tensor, stacked: bool = False) -> Tensor:
    """The norm of each unit of ``x``, broadcastable to ``x`` (the rule of :cite:t:`brock2021high`).

    A unit is an output unit's fan-in: every dim but 0 of a weight in PyTorch's ``(out, in, ...)``
    layout. A vector or scalar (a bias, a gain) is one unit. With ``stacked=True`` dim 0 indexes
    independent models and the rule applies to each ``x[s]``: a (S, out, in) weight has S·out
    units, a (S, 1, out) bias S units.

    >>> unitwise_norm(torch.tensor([[3.0, 4.0], [6.0, 8.0]]))
    tensor([[ 5.],
            [10.]])
    """
    one = x[0] if stacked else x
    offset = 1 if stacked else 0
    if sum(d > 1 for d in one.shape) <= 1:  # a vector or scalar: one unit
        dims = tuple(range(offset, x.dim()))
    else:
        dims = tuple(range(offset + 1, x.dim()))
    if not dims:
        return x.abs()
    return torch.linalg.vector_norm(x, dim=dims, keepdim=True)


@torch.no_grad()
def adaptive_grad_clip_(
    parameters: Iterable[Tensor],
    clipping: float = 0.01,
    eps: float = 1e-3,
    *,
    stacked: bool = False,
) -> None:
    """Adaptive gradient clipping (AGC), in place: rescale each unit's gradient ``G`` so that
    ``‖G‖ ≤ λ · max(‖W‖, eps)`` (equation ``eq-beyond-agc``, :cite:t:`brock2021high`).

    A unit whose gradient is small relative to its weights is left alone; the others are scaled
    down to the ratio λ. Parameters without a gradient are skipped. :cite:t:`brock2021high`
    exclude the final classifier layer; pass the others.

    Parameters
    ----------
    parameters : iterable of Tensor
    clipping : float
        λ > 0.
    eps : float
        Floor of the weight norm, so that zero-initialised parameters can move.
    stacked : bool
        Dim 0 of every parameter indexes independent models (:func:`unitwise_norm`).

    Raises
    ------
    ValueError
        ``clipping`` or ``eps`` not positive.
    """
    if not clipping > 0 or not eps > 0:
        raise ValueError(f"clipping and eps must be positive, got {clipping!r} and {eps!r}")
    params = [p for p in parameters if p.grad is not None]
    if not params:
        return
    grads = [p.grad for p in params]
    # scale = min(1, λ·max(‖W‖, eps) / max(‖G‖, 1e-6)), unit by unit; the elementwise steps run as
    # one fused call over all parameters (torch._foreach_*), the norms one parameter at a time.
    scale = [unitwise_norm(p, stacked) for p in params]
    grad_norm = [unitwise_norm(g, stacked) for g in grads]
    torch._foreach_clamp_min_(scale, eps)
    torch._foreach_mul_(scale, clipping)
    torch._foreach_clamp_min_(grad_norm, 1e-6)
    torch._foreach_div_(scale, grad_norm)
    torch._foreach_clamp_max_(scale, 1.0)
    torch._foreach_mul_(grads, scale)


class _SkipGain(nn.Module):
    """One learned scalar θ per model, initialised to 0 (SkipInit's gain, which its paper calls α)."""

    def __init__(self, n_models: int) -> None:
        super().__init__()
        self.theta = nn.Parameter(torch.zeros(n_models, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.theta


class ResidualMLP(nn.Module):
    """``n_models`` residual MLPs: a linear stem, ``depth`` two-layer residual blocks, a classifier.

    ``variant`` chooses how the network is kept trainable:

    * ``"batch"``: ``h ← h + W₂ ReLU(BN(W₁ ReLU(BN(h))))``, and BN → ReLU → linear at the end;
    * ``"skipinit"``: ``h ← h + θ · W₂ ReLU(W₁ ReLU(h))`` with a learned θ initialised to 0;
    * ``"nf"``: ``h ← h + ρ · θ · f(h / τ)`` with scaled weight standardisation in both linear
      layers of ``f`` (and in the stem), SkipInit's θ, a fixed ρ (``residual_scale``), and τ the
      expected standard deviation of ``h`` at that depth, ``sqrt(1 + l·ρ²)`` before block ``l``
      (equation ``eq-beyond-nf-var``). The NFNets of :cite:t:`brock2021high` carry θ as well.

    Linear layers are initialised as ``nn.Linear``; the standardised ones draw N(0, 1/fan_in).

    Parameters
    ----------
    variant : str
        One of :data:`VARIANTS`.
    n_models : int
    in_features, width, depth, classes : int
    residual_scale : float
        ρ, the NF variant's residual scale.

    Shape
    -----
    Input (N, in_features), shared, or (S, N, in_features); output (S, N, classes).
    """

    def __init__(
        self,
        variant: str,
        *,
        n_models: int = 1,
        in_features: int = 784,
        width: int = 64,
        depth: int = 4,
        classes: int = 10,
        residual_scale: float = 0.2,
    ) -> None:
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        self.variant, self.n_models = variant, n_models
        self.residual_scale = float(residual_scale)
        s = n_models
        if variant == "nf":
            self.stem = StackedWSLinear(s, in_features, width)
        else:
            self.stem = StackedLinear(s, in_features, width)
        self.blocks = nn.ModuleList(self._block(s, width) for _ in range(depth))
        self.head_norm = StackedBatchNorm(s, width) if variant == "batch" else None
        self.head = StackedLinear(s, width, classes)

    def _block(self, s: int, w: int) -> nn.Module:
        if self.variant == "batch":
            return nn.Sequential(
                StackedBatchNorm(s, w),
                nn.ReLU(),
                StackedLinear(s, w, w, bias=False),
                StackedBatchNorm(s, w),
                nn.ReLU(),
                StackedLinear(s, w, w),
            )
        if self.variant == "skipinit":
            return nn.Sequential(
                nn.ReLU(),
                StackedLinear(s, w, w),
                nn.ReLU(),
                StackedLinear(s, w, w),
                _SkipGain(s),
            )
        return nn.Sequential(
            nn.ReLU(),
            StackedWSLinear(s, w, w, RELU_GAIN),
            nn.ReLU(),
            StackedWSLinear(s, w, w, RELU_GAIN),
            _SkipGain(s),
        )

    def expected_std(self, block: int) -> float:
        """τ before block ``block`` (0-based) of the NF variant: ``sqrt(1 + block · ρ²)``."""
        return math.sqrt(1.0 + block * self.residual_scale**2)

    def forward(self, x: Tensor) -> Tensor:
        h = self.stem(x)
        for depth, block in enumerate(self.blocks):
            if self.variant == "nf":
                h = h + self.residual_scale * block(h / self.expected_std(depth))
            else:
                h = h + block(h)
        if self.head_norm is not None:
            h = self.head_norm(h)
        return self.head(F.relu(h))


def train_residual(
    model: ResidualMLP, *data: Tensor, clipping: float | None = None, **options
) -> History:
    """Train the ``S`` networks of ``model`` side by side with SGD and momentum.

    :func:`bnbook.train.train_stacked` (``data`` is its ``x_train, y_train, x_test, y_test``,
    ``options`` its keywords: ``steps``, ``lr``, ``seeds``, ``batch_size``, ``momentum``, …), with
    a diverging loss left to run on (it is recorded, not stopped), and with ``clipping`` = λ every
    gradient except the classifier's clipped by :func:`adaptive_grad_clip_` before the step.

    Returns
    -------
    History
        Evaluated on the test data before and after training (``final_acc``, ``final_loss``);
        every step's mini-batch loss in ``batch_loss`` (S, steps).

    Raises
    ------
    ValueError
        ``lr`` or ``seeds`` of a length other than S (from :func:`bnbook.train.train_stacked`).
    """
    clip = None
    if clipping is not None:
        clipped = [p for n, p in model.named_parameters() if not n.startswith("head.")]

        def clip(_: nn.Module) -> None:
            adaptive_grad_clip_(clipped, clipping, stacked=True)

    options.setdefault("momentum", 0.9)
    options.setdefault("batch_size", 64)
    return train_stacked(model, *data, diverge_loss=math.inf, before_step=clip, **options)
