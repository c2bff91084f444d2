"""Small models the chapters train, and how they are initialised.

Multilayer perceptrons (:func:`mlp`), two small convolutional networks (:func:`cnn` with pooling,
:func:`strided_cnn` with strided convolutions), the stacked CNN of the normalisation-family
comparison (:func:`family_cnn`), and a scaled initialisation (:func:`init_scaled_`).

>>> import torch
>>> from bnbook.models import mlp, cnn
>>> from bnbook.torch import BatchNorm1d, BatchNorm2d
>>> net = mlp((784, 100, 10), norm=BatchNorm1d)
>>> net
Sequential(
  (0): Linear(in_features=784, out_features=100, bias=False)
  (1): BatchNorm1d(100, eps=1e-05, momentum=0.1, affine=True, bias=True, track_running_stats=True)
  (2): ReLU()
  (3): Linear(in_features=100, out_features=10, bias=True)
)
>>> cnn(norm=BatchNorm2d)(torch.zeros(2, 1, 28, 28)).shape
torch.Size([2, 10])
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

from bnbook.norms import GroupNorm, InstanceNorm2d, weight_norm
from bnbook.small_batch import BatchLayerNorm, BatchRenorm2d, FullNormSketch
from bnbook.torch import BatchNorm2d

__all__ = [
    "ACTIVATIONS",
    "NormFactory",
    "mlp",
    "cnn",
    "strided_cnn",
    "init_scaled_",
    "FAMILY_METHODS",
    "family_cnn",
]

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "sigmoid": nn.Sigmoid,
    "tanh": nn.Tanh,
    "identity": nn.Identity,
}

#: ``norm(num_features)`` builds a normalisation layer, e.g. ``bnbook.torch.BatchNorm1d``.
NormFactory = Callable[[int], nn.Module]


def _activation(activation: str | Callable[[], nn.Module]) -> nn.Module:
    if isinstance(activation, str):
        if activation not in ACTIVATIONS:
            raise ValueError(
                f"activation must be one of {sorted(ACTIVATIONS)} or a module class, got {activation!r}"
            )
        return ACTIVATIONS[activation]()
    return activation()


def mlp(
    widths: Sequence[int] = (784, 100, 100, 100, 10),
    *,
    activation: str | Callable[[], nn.Module] = "relu",
    norm: NormFactory | None = None,
    norm_position: str = "before",
    dropout: float = 0.0,
    bias: bool | None = None,
    weight_std: float | None = None,
) -> nn.Sequential:
    """A fully connected network ``Linear → [norm] → activation → [dropout] → … → Linear``.

    Parameters
    ----------
    widths : sequence of int
        Input size, hidden widths, number of outputs: ``(784, 100, 10)`` has one hidden layer.
    activation : str or module class
        ``"relu"``, ``"sigmoid"``, ``"tanh"``, ``"identity"``, or e.g. ``nn.GELU``.
    norm : callable or None
        ``norm(num_features)`` builds a normalisation layer for each hidden layer, e.g.
        ``bnbook.torch.BatchNorm1d``; None for a plain network.
    norm_position : {"before", "after"}
        Normalise the pre-activation ``Wx`` (the original paper) or the activation's output (the
        source article's Keras example).
    dropout : float
        Dropout probability after each hidden activation (0 for none).
    bias : bool or None
        Bias on the hidden linear layers. None: no bias on a linear layer followed directly by a norm
        (its β makes a bias redundant, chapter ``ch-neuron``), a bias otherwise. The output layer
        always has a bias.
    weight_std : float or None
        If given, every linear weight is drawn from N(0, weight_std²) and biases start at 0;
        otherwise PyTorch's default initialisation.

    Returns
    -------
    nn.Sequential
    """
    if len(widths) < 2:
        raise ValueError(f"widths needs at least an input and an output size, got {tuple(widths)}")
    if norm_position not in ("before", "after"):
        raise ValueError(f"norm_position must be 'before' or 'after', got {norm_position!r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    layers: list[nn.Module] = []
    for fan_in, fan_out in zip(widths[:-2], widths[1:-1], strict=True):
        norm_first = norm is not None and norm_position == "before"
        use_bias = (not norm_first) if bias is None else bias
        layers.append(nn.Linear(fan_in, fan_out, bias=use_bias))
        if norm_first:
            layers.append(norm(fan_out))
        layers.append(_activation(activation))
        if norm is not None and norm_position == "after":
            layers.append(norm(fan_out))
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
    layers.append(nn.Linear(widths[-2], widths[-1]))
    net = nn.Sequential(*layers)
    if weight_std is not None:
        for module in net.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, 0.0, weight_std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
    return net


def cnn(
    channels: Sequence[int] = (16, 32),
    *,
    norm: NormFactory | None = None,
    num_classes: int = 10,
    activation: str | Callable[[], nn.Module] = "relu",
) -> nn.Sequential:
    """A small convolutional network for (N, 1, 28, 28) images.

    Each stage is ``Conv3x3 → [norm] → activation → MaxPool2``; then global average pooling and a
    linear classifier. Convolutions followed by a norm have no bias.

    Parameters
    ----------
    channels : sequence of int
        Output channels of each stage (28 → 14 → 7 → … pixels).
    norm : callable or None
        ``norm(num_channels)``, e.g. ``bnbook.torch.BatchNorm2d`` or a group-norm factory.
    num_classes : int
        Outputs.
    activation : str or module class
        As in :func:`mlp`.
    """
    layers: list[nn.Module] = []
    in_channels = 1
    for out_channels in channels:
        layers.append(nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=norm is None))
        if norm is not None:
            layers.append(norm(out_channels))
        layers += [_activation(activation), nn.MaxPool2d(2)]
        in_channels = out_channels
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(in_channels, num_classes)]
    return nn.Sequential(*layers)


def strided_cnn(
    channels: Sequence[int] = (8, 16, 32), *, norm: NormFactory | None = None
) -> nn.Sequential:
    """A convolutional network without pooling for (N, 1, 28, 28) images (chapter ``ch-conv``).

    Each stage is ``Conv3x3 (stride 2, padding 1) → [norm] → ReLU`` (28 → 14 → 7 → 4 pixels for
    three stages); then ``Flatten → Linear`` to 10 classes. Convolutions followed by a norm have no
    bias (its β makes one redundant).

    Parameters
    ----------
    channels : sequence of int
        Output channels of each stage.
    norm : callable or None
        ``norm(num_channels)``, e.g. ``torch.nn.BatchNorm2d``.

    Examples
    --------
    >>> net = strided_cnn((8, 16, 32), norm=nn.BatchNorm2d)
    >>> net(torch.zeros(2, 1, 28, 28)).shape
    torch.Size([2, 10])
    >>> net[-1]
    Linear(in_features=512, out_features=10, bias=True)
    """
    layers: list[nn.Module] = []
    c_in, side = 1, 28
    for c_out in channels:
        layers.append(nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, bias=norm is None))
        if norm is not None:
            layers.append(norm(c_out))
        layers.append(nn.ReLU())
        c_in, side = c_out, (side + 1) // 2
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(c_in * side * side, 10))


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

    Raises
    ------
    ValueError
        ``gain`` negative or not finite.

    Examples
    --------
    >>> net = init_scaled_(mlp((400, 300, 10)), math.sqrt(2))
    >>> round(float(net[0].weight.detach().var() * 400), 1)
    2.0
    """
    if not (math.isfinite(gain) and gain >= 0):
        raise ValueError(f"gain must be a finite number >= 0, got {gain!r}")
    for module in model.modules():
        if isinstance(module, nn.Linear):
            module.weight.normal_(0.0, gain / math.sqrt(module.in_features))
            if module.bias is not None:
                module.bias.fill_(bias)
    return model


# The comparison of chapter ch-family: one small CNN, every method, several seeds at once

#: The methods :func:`family_cnn` knows, in the order the chapter plots them.
FAMILY_METHODS: tuple[str, ...] = (
    "batch",
    "renorm",
    "batch-layer",
    "full-sketch",
    "layer",
    "group",
    "instance",
    "weight",
)


def _family_norm(method: str, channels: int, seeds: int, batch_size: int, groups: int, steps: int):
    total = seeds * channels
    if method == "batch":
        return BatchNorm2d(total)
    if (
        method == "renorm"
    ):  # batch norm for the first 20% of the steps, then relax over the next 30%
        warm, ramp = max(1, steps // 5), max(1, (3 * steps) // 10)
        return BatchRenorm2d(total, warmup_steps=warm, r_ramp_steps=ramp, d_ramp_steps=ramp)
    if method == "batch-layer":
        return BatchLayerNorm(total, batch_size=batch_size, layer_groups=seeds)
    if method == "full-sketch":
        return FullNormSketch(total, alpha=0.1)
    if method == "layer":  # over (C, H, W) of each network, with a per-channel scale and shift
        return GroupNorm(seeds, total)
    if method == "group":
        return GroupNorm(seeds * groups, total)
    if method == "instance":
        return InstanceNorm2d(total, affine=True)
    raise ValueError(f"method must be one of {FAMILY_METHODS}, got {method!r}")


def family_cnn(
    method: str,
    *,
    seeds: int = 1,
    batch_size: int = 32,
    channels: tuple[int, int] = (8, 16),
    groups: int = 4,
    steps: int = 60,
) -> nn.Sequential:
    """The small CNN of the chapter's comparison, for 14 × 14 images, ``seeds`` networks side by side.

    One network is ``Conv 4×4/2 (1→c₁) → norm → ReLU → Conv 3×3/2 (c₁→c₂) → norm → ReLU → Linear``
    (14 × 14 → 6 × 6 → 2 × 2 pixels). ``seeds`` independent copies share one set of tensors: channel
    block s of every layer belongs to network s (grouped convolutions; every norm acts within a
    network: per channel, or per sample within a block of channels), so one pass trains them all.
    Input (N, seeds, 14, 14): channel s holds network s's images; output (N, seeds, 10).

    ``method`` is one of :data:`FAMILY_METHODS`: ``"weight"`` is weight normalisation of both
    convolutions and no activation norm; ``"layer"`` normalises over (C, H, W) with a per-channel
    scale (group norm with one group); ``"group"`` uses ``groups`` groups.
    """
    from bnbook.stacked import StackedHead  # noqa: PLC0415 (bnbook.stacked imports this module)

    if method not in FAMILY_METHODS:
        raise ValueError(f"method must be one of {FAMILY_METHODS}, got {method!r}")
    c1, c2 = channels
    layers: list[nn.Module] = []
    for cin, cout, k in ((1, c1, 4), (c1, c2, 3)):
        conv = nn.Conv2d(
            seeds * cin, seeds * cout, k, stride=2, groups=seeds, bias=method == "weight"
        )
        if method == "weight":
            layers.append(weight_norm(conv))
        else:
            layers += [conv, _family_norm(method, cout, seeds, batch_size, groups, steps)]
        layers.append(nn.ReLU())
    layers.append(StackedHead(seeds, c2 * 4, 10))
    return nn.Sequential(*layers)
