"""Many small networks as one: the layers of the stacked experiments.

An experiment such as "sweep the learning rate over nine values, three seeds each, with and
without batch norm" trains dozens of small multilayer perceptrons. On a CPU each one is too small
to keep the processor busy: the time goes to launching operations, not to arithmetic. The layers
here hold ``S`` independent networks of one architecture **as one stacked network**: every weight
has a leading axis of length ``S``, every activation has shape ``(S, N, features)``, and one
batched matrix product serves all ``S`` networks.

The networks stay exactly independent: batch norm normalises each network's features over that
network's ``N`` samples only, and every parameter is laid out network-major, so a loss that sums
the networks' own losses gives each network the gradient of its own loss.
:func:`bnbook.train.train_stacked` trains them, each on its own mini-batches;
``tests/test_models_train.py`` checks that a stacked run equals ``S`` separate runs of ordinary
``nn.Sequential`` networks (with :class:`bnbook.torch.BatchNorm1d`) to float32 rounding.

>>> import torch
>>> from bnbook.stacked import stacked_mlp
>>> net = stacked_mlp(5, (784, 64, 64, 10), norm="batch")   # five networks in one
>>> net(torch.zeros(5, 32, 784)).shape                       # (networks, samples, classes)
torch.Size([5, 32, 10])
>>> net(torch.zeros(32, 784)).shape                          # one input shared by all five
torch.Size([5, 32, 10])
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bnbook.models import ACTIVATIONS, NormFactory

__all__ = [
    "StackedLinear",
    "StackedBatchNorm",
    "StackedNorm",
    "StackedDropout",
    "StackedHead",
    "Residual",
    "stacked_mlp",
    "rescale_weights",
    "n_models",
    "unstack",
]


def _check_positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def _check_stacked_input(x: Tensor, s: int, c: int, what: str) -> None:
    if x.dim() != 3 or x.shape[0] != s or x.shape[2] != c:
        raise ValueError(
            f"{what} expects input of shape (S, N, C) = ({s}, N, {c}), got {tuple(x.shape)}"
        )


class StackedLinear(nn.Module):
    """``S`` independent ``nn.Linear(in_features, out_features)`` layers applied as one.

    Parameters
    ----------
    n_models : int
        S.
    in_features, out_features : int
    bias : bool
        Learn a bias (default True).
    init : {"torch", "glorot", "he"} or float
        ``"torch"``: PyTorch's default for ``nn.Linear`` (weight and bias uniform in
        ±1/sqrt(in_features)); ``"glorot"``: Keras's default (weight uniform in
        ±sqrt(6/(in + out)), bias 0); ``"he"``: weight N(0, 2/in_features), bias 0; a number
        ``std``: weight N(0, std²), bias 0.

    Shape
    -----
    Input (S, N, in_features), or (N, in_features) shared by the S layers; output
    (S, N, out_features). ``weight`` is (S, out_features, in_features); ``bias`` (S, 1, out_features).

    Raises
    ------
    ValueError
        A size that is not a positive int, an unknown ``init``, or an input of the wrong shape.
    """

    def __init__(
        self,
        n_models: int,
        in_features: int,
        out_features: int,
        bias: bool = True,
        init: str | float = "torch",
    ) -> None:
        super().__init__()
        for name, value in (
            ("n_models", n_models),
            ("in_features", in_features),
            ("out_features", out_features),
        ):
            _check_positive_int(name, value)
        self.n_models, self.in_features, self.out_features = n_models, in_features, out_features
        self.weight = nn.Parameter(torch.empty(n_models, out_features, in_features))
        self.bias = nn.Parameter(torch.empty(n_models, 1, out_features)) if bias else None
        self.reset_parameters(init)

    def reset_parameters(self, init: str | float = "torch") -> None:
        """Draw new weights (and bias) as described in the class docstring."""
        fan_in, fan_out = self.in_features, self.out_features
        with torch.no_grad():
            if init == "torch":
                bound = 1.0 / math.sqrt(fan_in)
                self.weight.uniform_(-bound, bound)
                if self.bias is not None:
                    self.bias.uniform_(-bound, bound)
                return
            if init == "glorot":
                bound = math.sqrt(6.0 / (fan_in + fan_out))
                self.weight.uniform_(-bound, bound)
            elif init == "he":
                self.weight.normal_(0.0, math.sqrt(2.0 / fan_in))
            elif isinstance(init, (int, float)) and not isinstance(init, bool) and init >= 0:
                self.weight.normal_(0.0, float(init))
            else:
                raise ValueError(
                    f"init must be 'torch', 'glorot', 'he' or a std >= 0, got {init!r}"
                )
            if self.bias is not None:
                self.bias.zero_()

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 2:
            x = x.expand(self.n_models, *x.shape)
        _check_stacked_input(x, self.n_models, self.in_features, "StackedLinear")
        weight_t = self.weight.transpose(1, 2)
        if self.bias is None:
            return torch.bmm(x, weight_t)
        return torch.baddbmm(self.bias, x, weight_t)

    def extra_repr(self) -> str:
        return (
            f"n_models={self.n_models}, in_features={self.in_features}, "
            f"out_features={self.out_features}, bias={self.bias is not None}"
        )


class StackedBatchNorm(nn.Module):
    """Batch norm (equations (1)–(4)) for ``S`` stacked networks, one per network and feature.

    Same conventions as ``torch.nn.BatchNorm1d``: the biased batch variance normalises, the
    unbiased one enters the running estimate, ``momentum`` is the weight of the new batch. The
    (S, N, C) activations are viewed as (N, S·C) and handed to PyTorch's fused kernel
    (``torch.nn.functional.batch_norm``): statistics per (network, feature) over that network's N
    samples. ``tests/test_stacked.py`` checks it against :class:`bnbook.torch.BatchNorm1d`.

    Parameters
    ----------
    n_models, num_features : int
        S and C.
    eps, momentum : float
        As in ``torch.nn.BatchNorm1d`` (defaults 1e-5 and 0.1).
    ghost_batch_size : int, sequence of S (int or None), or None
        If given, training-mode statistics come from consecutive groups of this many samples
        ("ghost batches", :cite:t:`hoffer2017train`) instead of the whole mini-batch, whose size
        must be a multiple of it; one value per network allows a sweep in a single stack (None:
        the whole batch). The running estimates always use the whole mini-batch. Small groups
        make the statistics noisier (chapter ``ch-benefits``).

    Shape
    -----
    Input and output (S, N, C). ``weight`` (γ), ``bias`` (β), ``running_mean`` and ``running_var``
    are (S, 1, C).

    Raises
    ------
    ValueError
        A bad ``ghost_batch_size``, an input of the wrong shape, or a training batch that is not a
        multiple of the ghost batch size (or holds a single sample).
    """

    def __init__(
        self,
        n_models: int,
        num_features: int,
        eps: float = 1e-5,
        momentum: float = 0.1,
        ghost_batch_size: int | Sequence[int | None] | None = None,
    ) -> None:
        super().__init__()
        _check_positive_int("n_models", n_models)
        _check_positive_int("num_features", num_features)
        sizes = (
            [ghost_batch_size] * n_models
            if ghost_batch_size is None or isinstance(ghost_batch_size, int)
            else list(ghost_batch_size)
        )
        if len(sizes) != n_models or not all(
            g is None or (isinstance(g, int) and not isinstance(g, bool) and g >= 2) for g in sizes
        ):
            raise ValueError(
                "ghost_batch_size must be None, an int >= 2, or one such value per network "
                f"(S = {n_models}), got {ghost_batch_size!r}"
            )
        self.n_models, self.num_features = n_models, num_features
        self.eps, self.momentum = eps, momentum
        self.ghost_batch_size = ghost_batch_size
        self._sizes: list[int | None] = sizes
        self._assign_cache: dict = {}
        self.weight = nn.Parameter(torch.ones(n_models, 1, num_features))
        self.bias = nn.Parameter(torch.zeros(n_models, 1, num_features))
        self.register_buffer("running_mean", torch.zeros(n_models, 1, num_features))
        self.register_buffer("running_var", torch.ones(n_models, 1, num_features))

    def forward(self, x: Tensor) -> Tensor:
        s, c = self.n_models, self.num_features
        _check_stacked_input(x, s, c, "StackedBatchNorm")
        n = x.shape[1]
        if not self.training:
            scale = self.weight * torch.rsqrt(self.running_var + self.eps)
            return torch.addcmul(self.bias - self.running_mean * scale, x, scale)
        sizes = [n if g is None else g for g in self._sizes]
        for g in sizes:
            if n < 2 or n % g:
                raise ValueError(
                    f"StackedBatchNorm: a training batch of N = {n} samples must hold at least 2 "
                    f"and be a multiple of ghost_batch_size = {g}"
                )
        if all(g == n for g in sizes):  # the (N, S·C) view: one feature per (network, unit)
            y = F.batch_norm(
                x.transpose(0, 1).reshape(n, s * c),
                self.running_mean.view(-1),
                self.running_var.view(-1),
                self.weight.view(-1),
                self.bias.view(-1),
                True,
                self.momentum,
                self.eps,
            )
            return y.view(n, s, c).transpose(0, 1)
        # ghost batches: sample i of network s belongs to group i // g_s. With the 0/1 matrix
        # A[s, i, j] = [i // g_s == j], group sums are Aᵀx and "my group's value" is A(·):
        # one batched product for every network at once, whatever its group size.
        assign = self._assignment(n, sizes, x)  # (S, N, G)
        inv_g = torch.tensor([1.0 / g for g in sizes], dtype=x.dtype).view(s, 1, 1)
        mean = torch.bmm(assign, torch.bmm(assign.transpose(1, 2), x) * inv_g)  # (1)
        centred = x - mean
        var = torch.bmm(assign, torch.bmm(assign.transpose(1, 2), centred * centred) * inv_g)  # (2)
        y = centred * torch.rsqrt(var + self.eps) * self.weight + self.bias  # (3), (4)
        with torch.no_grad():  # running estimates from the whole mini-batch
            batch_mean = x.mean(1, keepdim=True)
            batch_var = ((x - batch_mean) ** 2).sum(1, keepdim=True) / (n - 1)
            self.running_mean.lerp_(batch_mean, self.momentum)
            self.running_var.lerp_(batch_var, self.momentum)
        return y

    def _assignment(self, n: int, sizes: list[int], like: Tensor) -> Tensor:
        key = (n, like.dtype)
        if key not in self._assign_cache:
            groups = n // min(sizes)
            sample = torch.arange(n).view(1, n, 1)
            group = torch.arange(groups).view(1, 1, groups)
            g = torch.tensor(sizes).view(-1, 1, 1)
            self._assign_cache[key] = (sample // g == group).to(like.dtype)
        return self._assign_cache[key]

    def extra_repr(self) -> str:
        return (
            f"n_models={self.n_models}, num_features={self.num_features}, eps={self.eps}, "
            f"momentum={self.momentum}, ghost_batch_size={self.ghost_batch_size}"
        )


class StackedNorm(nn.Module):
    """Apply any per-feature norm layer, e.g. :class:`bnbook.torch.BatchNorm1d`, to S networks.

    The (S, N, C) activations are viewed as (N, S·C), so ``norm(S * C)`` — which computes its
    statistics per feature over the N samples — sees one feature per (network, unit). Its
    parameters and buffers of length S·C are network-major: entry ``s * C + c`` belongs to
    network ``s``.

    Parameters
    ----------
    n_models, num_features : int
        S and C.
    norm : callable
        ``norm(S * C)`` builds the wrapped layer.

    Shape
    -----
    Input and output (S, N, C).
    """

    def __init__(self, n_models: int, num_features: int, norm: NormFactory) -> None:
        super().__init__()
        _check_positive_int("n_models", n_models)
        _check_positive_int("num_features", num_features)
        self.n_models, self.num_features = n_models, num_features
        self.norm = norm(n_models * num_features)

    def forward(self, x: Tensor) -> Tensor:
        s, c = self.n_models, self.num_features
        _check_stacked_input(x, s, c, "StackedNorm")
        n = x.shape[1]
        y = self.norm(x.transpose(0, 1).reshape(n, s * c))
        return y.view(n, s, c).transpose(0, 1)


class StackedDropout(nn.Module):
    """Dropout with its own probability for each of ``S`` stacked networks.

    In training, network ``s`` zeroes each activation with probability ``p[s]`` and scales the
    survivors by ``1 / (1 - p[s])`` (inverted dropout, as ``nn.Dropout``); ``p[s] = 0`` leaves
    network ``s`` untouched. In evaluation mode it is the identity.

    Parameters
    ----------
    p : sequence of S floats in [0, 1)
    """

    def __init__(self, p: Sequence[float]) -> None:
        super().__init__()
        p_arr = np.asarray(p, dtype=np.float64)
        if p_arr.ndim != 1 or p_arr.size == 0 or ((p_arr < 0) | (p_arr >= 1)).any():
            raise ValueError(f"p must be a sequence of probabilities in [0, 1), got {p!r}")
        self.register_buffer("p", torch.tensor(p_arr, dtype=torch.float32).view(-1, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or not bool((self.p > 0).any()):
            return x
        keep = 1.0 - self.p
        return x * (torch.rand_like(x) < keep) / keep

    def extra_repr(self) -> str:
        return f"p={[round(float(v), 4) for v in self.p.view(-1)]}"


class Residual(nn.Module):
    """``x + branch(x)``: a skip connection around ``branch`` (same input and output shape)."""

    def __init__(self, branch: nn.Module) -> None:
        super().__init__()
        self.branch = branch

    def forward(self, x: Tensor) -> Tensor:
        return x + self.branch(x)


def _activation(name: str) -> nn.Module:
    if name not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {name!r}")
    return ACTIVATIONS[name]()


def stacked_mlp(
    n_models: int,
    widths: Sequence[int] = (784, 100, 100, 100, 10),
    *,
    activation: str = "relu",
    norm: str | NormFactory | None = None,
    norm_position: str = "before",
    dropout: float | Sequence[float] = 0.0,
    bias: bool | None = None,
    init: str | float = "torch",
    residual: bool = False,
    norm_kwargs: dict | None = None,
) -> nn.Sequential:
    """``n_models`` independent copies of a :func:`bnbook.models.mlp` network, stacked.

    Parameters
    ----------
    n_models : int
        S, the number of independent networks.
    widths, activation, norm_position, bias
        As in :func:`bnbook.models.mlp`: ``Linear → [norm] → activation → [dropout]`` per hidden
        layer (``norm_position="after"`` puts the norm after the activation, as the source
        article's Keras model does), then a ``Linear`` output layer; ``bias=None`` drops the bias
        of a linear layer followed directly by a norm.
    norm : None, "batch" or callable
        None: no normalisation. ``"batch"``: :class:`StackedBatchNorm`, built with ``norm_kwargs``
        (e.g. ``{"ghost_batch_size": 8}``). A callable ``norm(num_features)`` as in
        :func:`bnbook.models.mlp` (e.g. ``bnbook.torch.BatchNorm1d``), wrapped in
        :class:`StackedNorm`.
    dropout : float or sequence of S floats
        Dropout probability after each hidden activation, the same for all networks or one per
        network (:class:`StackedDropout`); 0 for none.
    init : {"torch", "glorot", "he"} or float
        Initialisation of every linear layer (:class:`StackedLinear`).
    residual : bool
        Turn every hidden layer after the first into a pre-activation residual block,
        ``h ← h + Linear(activation([norm](h)))`` (:cite:t:`he2016deep`); all hidden widths must
        then be equal. The first hidden layer stays ``Linear → [norm] → activation``.
    norm_kwargs : dict or None
        Keyword arguments of :class:`StackedBatchNorm` when ``norm="batch"``.

    Returns
    -------
    nn.Sequential
        Maps (S, N, widths[0]), or (N, widths[0]) shared by all networks, to (S, N, widths[-1]).

    Raises
    ------
    ValueError
        Fewer than two widths, an unknown ``norm``, ``norm_position`` or activation, a dropout
        probability outside [0, 1), or unequal hidden widths with ``residual=True``.

    Examples
    --------
    >>> import torch
    >>> net = stacked_mlp(3, (196, 32, 32, 32, 10), norm="batch", residual=True)
    >>> net(torch.zeros(3, 8, 196)).shape
    torch.Size([3, 8, 10])
    """
    _check_positive_int("n_models", n_models)
    if len(widths) < 2:
        raise ValueError(f"widths needs at least an input and an output size, got {tuple(widths)}")
    if norm_position not in ("before", "after"):
        raise ValueError(f"norm_position must be 'before' or 'after', got {norm_position!r}")
    if isinstance(norm, str) and norm != "batch":
        raise ValueError(f"norm must be None, 'batch' or a callable, got {norm!r}")
    if residual and len(set(widths[1:-1])) > 1:
        raise ValueError(f"residual=True needs equal hidden widths, got {tuple(widths[1:-1])}")
    p = np.broadcast_to(np.asarray(dropout, dtype=np.float64), (n_models,))
    if ((p < 0) | (p >= 1)).any():
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
    _activation(activation)
    s = n_models

    def normed(width: int) -> nn.Module:
        if norm == "batch":
            return StackedBatchNorm(s, width, **(norm_kwargs or {}))
        return StackedNorm(s, width, norm)

    def dropped() -> list[nn.Module]:
        return [StackedDropout(p)] if (p > 0).any() else []

    layers: list[nn.Module] = []
    hidden = list(zip(widths[:-2], widths[1:-1], strict=True))
    for i, (fan_in, fan_out) in enumerate(hidden):
        if residual and i > 0:
            branch: list[nn.Module] = [normed(fan_in)] if norm is not None else []
            branch += [_activation(activation), *dropped()]
            branch.append(StackedLinear(s, fan_in, fan_out, init=init))
            layers.append(Residual(nn.Sequential(*branch)))
            continue
        norm_first = norm is not None and norm_position == "before"
        use_bias = (not norm_first) if bias is None else bias
        layers.append(StackedLinear(s, fan_in, fan_out, bias=use_bias, init=init))
        if norm_first:
            layers.append(normed(fan_out))
        layers.append(_activation(activation))
        if norm is not None and norm_position == "after":
            layers.append(normed(fan_out))
        layers += dropped()
    layers.append(StackedLinear(s, widths[-2], widths[-1], init=init))
    return nn.Sequential(*layers)


def rescale_weights(model: nn.Module, gains: Sequence[float]) -> nn.Module:
    """Multiply every linear weight of network ``s`` by ``gains[s]``, in place.

    With ``init="he"``, network ``s`` then starts from weights N(0, gains[s]² · 2/fan_in): the
    weight-scale sweep of chapter ``ch-benefits``. Biases are left alone.

    Returns
    -------
    nn.Module
        ``model`` itself.
    """
    s = n_models(model)
    g = torch.as_tensor(np.asarray(gains, dtype=np.float64), dtype=torch.float32)
    if g.shape != (s,):
        raise ValueError(
            f"gains must hold one value per network (S = {s}), got shape {tuple(g.shape)}"
        )
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, StackedLinear):
                m.weight.mul_(g.view(s, 1, 1))
    return model


def n_models(model: nn.Module) -> int:
    for m in model.modules():
        if isinstance(m, StackedLinear):
            return m.n_models
    raise ValueError("model holds no StackedLinear layer: build it with stacked_mlp")


def unstack(model: nn.Sequential, index: int) -> nn.Sequential:
    """Network ``index`` of a :func:`stacked_mlp`, as an ordinary ``nn.Sequential`` (a copy).

    ``StackedLinear`` becomes ``nn.Linear``; ``StackedBatchNorm`` becomes
    :class:`bnbook.torch.BatchNorm1d`; a ``StackedNorm`` becomes a layer of the class it wraps;
    ``StackedDropout`` becomes ``nn.Dropout``. Parameters, buffers and the training flag are copied.

    Raises
    ------
    IndexError
        ``index`` outside ``[0, S)``.
    ValueError
        Network ``index`` normalises over ghost batches, which ``BatchNorm1d`` cannot.
    """
    s = n_models(model)
    if not 0 <= index < s:
        raise IndexError(f"index must be in [0, {s}), got {index}")

    def convert(module: nn.Module) -> nn.Module:
        if isinstance(module, StackedLinear):
            lin = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
            with torch.no_grad():
                lin.weight.copy_(module.weight[index])
                if module.bias is not None:
                    lin.bias.copy_(module.bias[index, 0])
            return lin
        if isinstance(module, StackedBatchNorm):
            if module._sizes[index] is not None:
                raise ValueError("unstack: a ghost-batch norm has no single-network twin here")
            from bnbook.torch import BatchNorm1d

            bn = BatchNorm1d(module.num_features, eps=module.eps, momentum=module.momentum)
            with torch.no_grad():
                for name in ("weight", "bias", "running_mean", "running_var"):
                    getattr(bn, name).copy_(getattr(module, name)[index, 0])
            return bn
        if isinstance(module, StackedNorm):
            c = module.num_features
            state = {
                k: (v[index * c : (index + 1) * c] if v.dim() == 1 else v)
                for k, v in module.norm.state_dict().items()
            }
            kwargs = {
                k: getattr(module.norm, k)
                for k in ("eps", "momentum", "affine", "track_running_stats")
                if hasattr(module.norm, k)
            }
            single = type(module.norm)(c, **kwargs)
            single.load_state_dict(state)
            return single
        if isinstance(module, StackedDropout):
            return nn.Dropout(float(module.p[index]))
        if isinstance(module, Residual):
            return Residual(convert(module.branch))
        if isinstance(module, nn.Sequential):
            return nn.Sequential(*(convert(m) for m in module))
        return type(module)()  # activations: stateless

    return convert(model).train(model.training)


class StackedHead(nn.Module):
    """``seeds`` independent linear classifiers: (N, seeds·F) features → (N, seeds, out) logits."""

    def __init__(self, seeds: int, in_features: int, out_features: int) -> None:
        super().__init__()
        self.seeds, self.in_features = seeds, in_features
        bound = 1.0 / math.sqrt(in_features)  # nn.Linear's default initialisation, per network
        self.weight = nn.Parameter(
            torch.empty(seeds, in_features, out_features).uniform_(-bound, bound)
        )
        self.bias = nn.Parameter(torch.empty(seeds, out_features).uniform_(-bound, bound))

    def forward(self, x: Tensor) -> Tensor:
        h = x.reshape(x.shape[0], self.seeds, self.in_features)
        return torch.einsum("nsf,sfk->nsk", h, self.weight) + self.bias
