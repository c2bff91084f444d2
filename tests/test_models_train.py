"""bnbook.models and bnbook.train."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import bnbook
from bnbook.data import load_mnist_subset
from bnbook.models import cnn, mlp
from bnbook.torch import BatchNorm1d, BatchNorm2d
from bnbook.train import History, batches, evaluate, train_classifier


def test_mlp_layout_and_bias_rule():
    plain = mlp((784, 50, 50, 10), activation="sigmoid")
    assert [type(m).__name__ for m in plain] == ["Linear", "Sigmoid", "Linear", "Sigmoid", "Linear"]
    assert all(m.bias is not None for m in plain if isinstance(m, nn.Linear))
    before = mlp((784, 50, 10), norm=BatchNorm1d)
    assert [type(m).__name__ for m in before] == ["Linear", "BatchNorm1d", "ReLU", "Linear"]
    assert before[0].bias is None, "a bias right before BN is redundant"
    after = mlp((784, 50, 10), norm=BatchNorm1d, norm_position="after", dropout=0.5)
    assert [type(m).__name__ for m in after] == [
        "Linear",
        "ReLU",
        "BatchNorm1d",
        "Dropout",
        "Linear",
    ]
    assert after[0].bias is not None


def test_weight_std_initialisation():
    torch.manual_seed(0)
    net = mlp((784, 400, 10), weight_std=0.5)
    assert abs(net[0].weight.std().item() - 0.5) < 0.01
    assert torch.count_nonzero(net[0].bias) == 0


def test_bad_arguments():
    with pytest.raises(ValueError, match="activation"):
        mlp((4, 4, 2), activation="swish")
    with pytest.raises(ValueError, match="norm_position"):
        mlp((4, 4, 2), norm=BatchNorm1d, norm_position="middle")
    with pytest.raises(ValueError, match="batch_size"):
        next(batches(10, 11, seed=0))


def test_cnn_shapes():
    net = cnn((4, 8), norm=BatchNorm2d)
    assert net(torch.zeros(3, 1, 28, 28)).shape == (3, 10)
    assert all(m.bias is None for m in net if isinstance(m, nn.Conv2d))


def test_batches_cover_each_epoch_once():
    it = batches(10, 5, seed=0)
    first_epoch = torch.tensor(list(next(it)) + list(next(it)))
    assert sorted(first_epoch.tolist()) == list(range(10))


def test_training_learns_and_is_reproducible():
    data = load_mnist_subset()

    def run():
        bnbook.seed_everything(0)
        return train_classifier(
            mlp((784, 64, 10), norm=BatchNorm1d), data, steps=150, eval_every=50, lr=0.1
        )

    a, b = run(), run()
    assert a.steps == [0, 50, 100, 150]
    assert a.eval_acc == b.eval_acc
    assert a.eval_acc[0] < 0.3 < 0.8 < a.eval_acc[-1]
    assert a.steps_to(0.8) is not None and a.steps_to(1.01) is None


def test_divergence_is_detected():
    bnbook.seed_everything(0)
    hist = train_classifier(mlp((784, 64, 64, 10)), load_mnist_subset(), steps=200, lr=1e6)
    assert hist.diverged and isinstance(hist, History)
    assert hist.steps[-1] < 200


def test_evaluate_restores_mode():
    net = mlp((784, 8, 10), norm=BatchNorm1d)
    d = load_mnist_subset(as_torch=True)
    net.train()
    loss, acc = evaluate(net, d.x_test, d.y_test)
    assert net.training and 0 <= acc <= 1 and loss > 0
