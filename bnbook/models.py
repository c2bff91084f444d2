"""Small models the chapters train: multilayer perceptrons and a convolutional network.

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

from collections.abc import Callable, Sequence

from torch import nn

__all__ = ["ACTIVATIONS", "mlp", "cnn"]

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "sigmoid": nn.Sigmoid,
    "tanh": nn.Tanh,
    "identity": nn.Identity,
}

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
