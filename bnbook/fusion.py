r"""Fold an inference-mode batch norm into the linear or convolution layer before it.

In evaluation mode a batch-norm layer with running statistics is a fixed affine map per channel,

.. math::

    y_c = a_c x_c + b_c, \qquad a_c = \frac{\gamma_c}{\sqrt{\hat\sigma^2_c + \varepsilon}},
    \qquad b_c = \beta_c - a_c \hat\mu_c,

where :math:`\hat\mu_c` and :math:`\hat\sigma^2_c` are the running mean and variance
(equation ``eq-inference-affine`` in chapter ``ch-inference``). A linear or convolution layer that
feeds it is affine per output channel too, so the two compose into one layer of the same kind:
scale output channel ``c`` of the weight by :math:`a_c` and replace the bias by
:math:`a_c (\mathrm{bias}_c - \hat\mu_c) + \beta_c`. At inference the batch norm then costs
nothing.

The folded weights are computed in float64 and cast back to the layer's dtype, so a float32 model
loses no more precision than one rounding. Inputs are never modified: every function returns new
modules.

>>> import torch
>>> from torch import nn
>>> from bnbook.fusion import fold_bn
>>> model = nn.Sequential(nn.Linear(4, 3, bias=False), nn.BatchNorm1d(3), nn.ReLU()).eval()
>>> folded = fold_bn(model)
>>> folded
Sequential(
  (0): Linear(in_features=4, out_features=3, bias=True)
  (1): Identity()
  (2): ReLU()
)
>>> x = torch.randn(5, 4)
>>> folded(x).shape
torch.Size([5, 3])
>>> bool(torch.allclose(folded(x), model(x), atol=1e-6))
True
"""

from __future__ import annotations

import copy
from typing import TypeVar

import torch
from torch import nn

from bnbook.torch import _NormBase

__all__ = [
    "is_batch_norm",
    "inference_affine",
    "fold_bn_into_linear",
    "fold_bn_into_conv",
    "fold_bn",
]

ConvT = TypeVar("ConvT", nn.Conv1d, nn.Conv2d, nn.Conv3d)

_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def is_batch_norm(module: nn.Module) -> bool:
    """Whether ``module`` is a batch-norm layer, decided by its type, never by its name.

    True for torch's batch norms (``torch.nn.modules.batchnorm._BatchNorm``: ``BatchNorm1d/2d/3d``,
    ``SyncBatchNorm``, the lazy ones) and for every layer of this package built on
    :class:`bnbook.torch._NormBase` that keeps running statistics and evaluates with them as one
    affine map per channel (the twins, ghost batch norm, batch renormalisation, synchronised batch
    norm, instance norm with ``track_running_stats=True``, the Full Normalisation sketch); not for
    :class:`bnbook.small_batch.BatchLayerNorm`, whose evaluation mixes in per-sample statistics.

    >>> from bnbook.norms import InstanceNorm2d
    >>> is_batch_norm(nn.BatchNorm2d(3)), is_batch_norm(InstanceNorm2d(3, track_running_stats=True))
    (True, True)
    >>> is_batch_norm(InstanceNorm2d(3)), is_batch_norm(nn.LayerNorm(3))
    (False, False)
    """
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return True
    return bool(
        isinstance(module, _NormBase)
        and module.track_running_stats
        and getattr(type(module), "eval_is_affine", True)
    )


def _check_bn(bn: nn.Module, what: str) -> None:
    if not is_batch_norm(bn):
        raise TypeError(
            "bn must be a batch-norm layer with running statistics (see is_batch_norm), got "
            f"{type(bn).__name__}"
        )
    if bn.training:
        raise RuntimeError(
            f"cannot fold {type(bn).__name__} into the {what}: it is in training mode, where it "
            "normalises with the statistics of each batch; call .eval() first"
        )
    running_mean = getattr(bn, "running_mean", None)
    if running_mean is None or bn.running_var is None:
        raise ValueError(
            f"cannot fold {type(bn).__name__}: it has no running statistics "
            "(track_running_stats=False), so even in eval mode it normalises with batch statistics "
            "and is not a fixed affine map"
        )
    if isinstance(running_mean, nn.parameter.UninitializedBuffer):
        raise ValueError(f"cannot fold {type(bn).__name__}: its buffers are not initialised yet")


def inference_affine(bn: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-channel scale and shift of a batch-norm layer in evaluation mode.

    Parameters
    ----------
    bn : torch.nn.BatchNorm1d, BatchNorm2d, BatchNorm3d or a bnbook.torch twin
        In eval mode, with running statistics.

    Returns
    -------
    scale, shift : torch.Tensor, shape (C,), float64
        ``bn(x) == scale * x + shift`` along the channel axis, with
        ``scale = weight / sqrt(running_var + eps)`` and ``shift = bias - scale * running_mean``
        (``weight`` = 1 and ``bias`` = 0 when ``affine=False``).

    Raises
    ------
    TypeError
        If ``bn`` is not a batch-norm layer.
    RuntimeError
        If ``bn`` is in training mode.
    ValueError
        If ``bn`` has no running statistics (``track_running_stats=False``).

    References
    ----------
    Equation ``eq-inference-affine``, chapter ``ch-inference``.

    Examples
    --------
    >>> import torch
    >>> bn = torch.nn.BatchNorm1d(3).eval()
    >>> scale, shift = inference_affine(bn)
    >>> scale.shape, shift.dtype
    (torch.Size([3]), torch.float64)
    """
    _check_bn(bn, "affine map")
    mean = bn.running_mean.detach().to(torch.float64)
    var = bn.running_var.detach().to(torch.float64)
    scale = torch.rsqrt(var + bn.eps)
    if getattr(bn, "weight", None) is not None:
        scale = scale * bn.weight.detach().to(torch.float64)
    shift = -scale * mean
    if getattr(bn, "bias", None) is not None:
        shift = shift + bn.bias.detach().to(torch.float64)
    return scale, shift


def _folded_parameters(
    weight: nn.Parameter, bias: nn.Parameter | None, bn: nn.Module
) -> tuple[nn.Parameter, nn.Parameter]:
    scale, shift = inference_affine(bn)
    w64 = weight.detach().to(torch.float64)
    b64 = torch.zeros_like(scale) if bias is None else bias.detach().to(torch.float64)
    new_weight = w64 * scale.reshape((-1,) + (1,) * (w64.ndim - 1))
    new_bias = b64 * scale + shift
    bias_dtype = weight.dtype if bias is None else bias.dtype
    bias_grad = weight.requires_grad if bias is None else bias.requires_grad
    return (
        nn.Parameter(new_weight.to(weight.dtype), requires_grad=weight.requires_grad),
        nn.Parameter(new_bias.to(bias_dtype), requires_grad=bias_grad),
    )


def fold_bn_into_linear(linear: nn.Linear, bn: nn.Module) -> nn.Linear:
    """A new ``nn.Linear`` equal to ``bn(linear(x))`` for ``bn`` in evaluation mode.

    Parameters
    ----------
    linear : torch.nn.Linear
        The layer whose outputs ``bn`` normalises (its mode does not matter: a linear layer has none
        that changes its output).
    bn : torch.nn.BatchNorm1d or a bnbook.torch twin
        In eval mode, with running statistics, ``num_features == linear.out_features``.

    Returns
    -------
    torch.nn.Linear
        A copy of ``linear`` with weight ``scale[:, None] * W`` and bias
        ``scale * (b - running_mean) + beta``; it always has a bias. Same dtype, device and
        ``requires_grad`` as ``linear``.

    Shape
    -----
    Input ``(N, in_features)``, output ``(N, out_features)``: the folded layer reproduces ``bn``
    applied to a 2-D ``(N, C)`` batch, the case in which a Linear can feed a BatchNorm1d.

    Raises
    ------
    TypeError
        If ``linear`` is not an ``nn.Linear`` or ``bn`` is not a batch-norm layer.
    RuntimeError
        If ``bn`` is in training mode.
    ValueError
        If ``bn.num_features != linear.out_features``, or ``bn`` has no running statistics.

    References
    ----------
    Chapter ``ch-inference``, section on folding.

    Examples
    --------
    >>> import torch
    >>> lin, bn = torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3).eval()
    >>> folded = fold_bn_into_linear(lin, bn)
    >>> folded.weight.shape, folded.bias.shape
    (torch.Size([3, 4]), torch.Size([3]))
    """
    if not isinstance(linear, nn.Linear):
        raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
    return _fold(linear, bn, "linear.out_features", linear.out_features)


def fold_bn_into_conv(conv: ConvT, bn: nn.Module) -> ConvT:
    """A new convolution equal to ``bn(conv(x))`` for ``bn`` in evaluation mode.

    Parameters
    ----------
    conv : torch.nn.Conv1d, Conv2d or Conv3d
        Any padding, stride, dilation or groups; transposed convolutions are not supported.
    bn : nn.Module
        Any layer :func:`is_batch_norm` accepts (``BatchNorm1d/2d/3d``, the package's twins and
        variants), in eval mode, with ``num_features == conv.out_channels``.

    Returns
    -------
    same type as ``conv``
        A copy of ``conv`` whose output channel ``c`` has weight ``scale[c] * W[c]`` and bias
        ``scale[c] * (b[c] - running_mean[c]) + beta[c]``; it always has a bias.

    Shape
    -----
    As ``conv``: input ``(N, C_in, *spatial)``, output ``(N, C_out, *spatial_out)``.

    Raises
    ------
    TypeError, RuntimeError, ValueError
        As :func:`fold_bn_into_linear`, for a convolution that is not one (transposed ones are not)
        and for ``bn.num_features != conv.out_channels``.

    Examples
    --------
    >>> import torch
    >>> conv, bn = torch.nn.Conv2d(1, 8, 3, bias=False), torch.nn.BatchNorm2d(8).eval()
    >>> folded = fold_bn_into_conv(conv, bn)
    >>> folded(torch.randn(2, 1, 5, 5)).shape
    torch.Size([2, 8, 3, 3])
    """
    if not isinstance(conv, _CONV_TYPES):
        raise TypeError(
            f"conv must be an nn.Conv1d, nn.Conv2d or nn.Conv3d, got {type(conv).__name__}"
        )
    return _fold(conv, bn, "conv.out_channels", conv.out_channels)


def _fold(layer: nn.Module, bn: nn.Module, name: str, channels: int) -> nn.Module:
    """A copy of ``layer`` (Linear or Conv) with ``bn``'s inference map folded into it."""
    _check_bn(bn, "linear layer" if isinstance(layer, nn.Linear) else "convolution")
    if bn.num_features != channels:
        raise ValueError(f"bn.num_features must equal {name} = {channels}, got {bn.num_features}")
    folded = copy.deepcopy(layer)
    folded.weight, folded.bias = _folded_parameters(layer.weight, layer.bias, bn)
    return folded


def _fold_sequential(seq: nn.Sequential) -> int:
    """Fold in place inside ``seq`` (a private copy); returns the number of pairs folded."""
    children = list(seq.named_children())
    count = 0
    for (name, layer), (next_name, nxt) in zip(children, children[1:], strict=False):
        if not (is_batch_norm(nxt) and isinstance(layer, (nn.Linear, *_CONV_TYPES))):
            continue
        if getattr(nxt, "running_mean", None) is None:
            continue  # no running statistics: not an affine map, leave it as it is
        width = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
        setattr(seq, name, _fold(layer, nxt, "the width of the layer before it", width))
        setattr(seq, next_name, nn.Identity())
        count += 1
    for _, child in seq.named_children():
        if isinstance(child, nn.Sequential):
            count += _fold_sequential(child)
    return count


def fold_bn(model: nn.Sequential) -> nn.Sequential:
    """A copy of ``model`` with every Linear/Conv → BatchNorm pair folded into one layer.

    Each pair of consecutive children ``(nn.Linear | nn.Conv1d/2d/3d, BatchNorm)`` becomes
    ``(folded layer, nn.Identity())``, so the indices and names of the other layers do not change.
    Nested ``nn.Sequential`` children are folded too. A batch norm without running statistics
    (``track_running_stats=False``) is left in place: it is not a fixed map even in eval mode.

    Parameters
    ----------
    model : torch.nn.Sequential
        Every batch norm that follows a Linear or Conv must be in eval mode (call ``model.eval()``).

    Returns
    -------
    torch.nn.Sequential
        A new model; ``model`` is not modified. It computes the same function as ``model`` in eval
        mode, up to floating-point rounding.

    Raises
    ------
    TypeError
        If ``model`` is not an ``nn.Sequential``.
    RuntimeError
        If a batch norm that would be folded is in training mode.
    ValueError
        If a batch norm's ``num_features`` does not match the layer before it.

    References
    ----------
    Chapter ``ch-inference``, section on folding; ``ch-cost`` measures what it saves.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> cnn = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).eval()
    >>> [type(m).__name__ for m in fold_bn(cnn)]
    ['Conv2d', 'Identity', 'ReLU']
    """
    if not isinstance(model, nn.Sequential):
        raise TypeError(f"model must be an nn.Sequential, got {type(model).__name__}")
    folded = copy.deepcopy(model)
    _fold_sequential(folded)
    return folded
