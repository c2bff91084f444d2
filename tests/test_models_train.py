"""bnbook.models, bnbook.train (the one loop and its entry points) and bnbook.optim."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bnbook
from bnbook.data import load_mnist_subset
from bnbook.models import FAMILY_METHODS, cnn, family_cnn, init_scaled_, mlp, strided_cnn
from bnbook.optim import StackedAdam, StackedSGD
from bnbook.stacked import stacked_mlp, unstack
from bnbook.torch import BatchNorm1d, BatchNorm2d
from bnbook.train import (
    History,
    batch_indices,
    batches,
    eval_steps,
    evaluate,
    fit,
    sample,
    train_classifier,
    train_family,
    train_stacked,
)


def toy_data(n=120, d=12, k=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    y = torch.randint(0, k, (n,), generator=g)
    return x, y


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
    np.testing.assert_array_equal(a.steps, [0, 50, 100, 150])
    np.testing.assert_array_equal(a.eval_acc, b.eval_acc)
    assert a.eval_acc[0] < 0.3 < 0.8 < a.final_acc
    assert a.steps_to(0.8) in (50.0, 100.0, 150.0) and a.steps_to(1.01) == math.inf
    assert a.batch_loss.shape == (150,) and np.isnan(a.train_loss[0])
    np.testing.assert_allclose(a.train_loss[1], a.batch_loss[:50].mean())


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


# --- models --------------------------------------------------------------------------------------


def test_init_scaled_sets_the_weight_scale_and_biases():
    torch.manual_seed(0)
    net = init_scaled_(mlp((400, 300, 10), bias=True), 2.0, bias=0.25)
    std = net[0].weight.std().item()
    assert abs(std - 2.0 / math.sqrt(400)) < 0.01 * 2.0 / math.sqrt(400)
    assert abs(net[2].weight.std().item() - 2.0 / math.sqrt(300)) < 0.05 * 2.0 / math.sqrt(300)
    assert torch.all(net[0].bias == 0.25) and torch.all(net[2].bias == 0.25)


@pytest.mark.parametrize("gain", [-1.0, math.inf, math.nan])
def test_init_scaled_rejects_bad_gains(gain):
    with pytest.raises(ValueError, match="gain"):
        init_scaled_(mlp((3, 2)), gain)


def test_strided_cnn_layout():
    plain, normed = strided_cnn((4, 8, 16)), strided_cnn((4, 8, 16), norm=nn.BatchNorm2d)
    assert [type(m).__name__ for m in normed][:3] == ["Conv2d", "BatchNorm2d", "ReLU"]
    assert all(m.bias is None for m in normed if isinstance(m, nn.Conv2d))
    assert all(m.bias is not None for m in plain if isinstance(m, nn.Conv2d))
    assert plain[-1].in_features == 16 * 4 * 4  # 28 -> 14 -> 7 -> 4 pixels
    assert normed(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


@pytest.mark.parametrize("method", FAMILY_METHODS)
def test_family_cnn_shapes(method):
    net = family_cnn(method, seeds=2, batch_size=4, steps=10)
    assert net(torch.randn(4, 2, 14, 14)).shape == (4, 2, 10)


def test_family_cnn_rejects_unknown_method():
    with pytest.raises(ValueError, match="method"):
        family_cnn("dropout")


# --- the sampler and the loop --------------------------------------------------------------------


def test_batch_indices_are_the_batches_of_each_seed():
    idx = batch_indices(10, 3, 7, seeds=[0, 1])
    for j, seed in enumerate([0, 1]):
        order = batches(10, 3, seed=seed)
        np.testing.assert_array_equal(idx[:, j], [next(order) for _ in range(7)])
    with pytest.raises(ValueError, match="batch_size"):
        batch_indices(10, 11, 0, seeds=[0])


def test_sample_gives_one_or_stacked_batches():
    x, y = toy_data(n=20, d=3)
    xb, yb = next(sample(x, y, 4, seeds=7))
    idx = torch.from_numpy(next(batches(20, 4, seed=7)))
    torch.testing.assert_close(xb, x[idx])
    xs, ys = next(sample(x, y, 4, seeds=[7, 8]))
    assert xs.shape == (2, 4, 3) and ys.shape == (2, 4)
    torch.testing.assert_close(xs[0], xb)
    other = torch.from_numpy(next(batches(20, 4, seed=8)))
    assert torch.equal(xs[1], x[other]) and torch.equal(ys, torch.stack([y[idx], y[other]]))
    images = x.view(20, 1, 3, 1)  # more than one feature axis: rows are gathered whole
    assert torch.equal(
        next(sample(images, y, 4, seeds=[7, 8]))[0], images[torch.stack([idx, other])]
    )


def test_eval_steps():
    assert eval_steps(10, 5) == {0, 5, 10}
    assert eval_steps(0, None, start=False) == {0}


def test_fit_runs_the_hook_before_each_step_and_stops_when_all_diverged():
    x, y = toy_data()
    net = mlp((12, 8, 4))
    calls = []

    def hook(model):
        calls.append(all(p.grad is not None for p in model.parameters()))

    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    hist = fit(net, sample(x, y, 10, seeds=0), opt, steps=5, before_step=hook)
    assert calls == [True] * 5 and hist.batch_loss.shape == (5,) and hist.steps.size == 0
    with pytest.raises(ValueError, match="evaluate"):
        fit(net, sample(x, y, 10, seeds=0), opt, steps=1, eval_at={1})
    with pytest.raises(ValueError, match="steps"):
        fit(net, sample(x, y, 10, seeds=0), opt, steps=-1)
    big = torch.optim.SGD(net.parameters(), lr=1e30)
    run = fit(net, sample(x * 1e6, y, 10, seeds=0), big, steps=50, stop_on_divergence=True)
    assert run.diverged is True and run.batch_loss.shape[0] < 50


def test_train_family_returns_one_accuracy_per_seed_and_learns():
    gen = torch.Generator().manual_seed(0)
    y = torch.randint(0, 10, (200,), generator=gen)
    x = torch.rand(200, 1, 14, 14, generator=gen) * 0.1
    x[torch.arange(200), 0, y, y] = 3.0  # the label is written in the image
    acc = train_family("batch", 20, x, y, x, y, seeds=(0, 1), steps=60, lr=1e-2)
    assert acc.shape == (2,) and (acc > 0.5).all(), acc


def test_train_family_networks_train_as_separate_ones_would():
    """Network 1 of a two-network run ends as a one-network run with network 1's seed."""
    gen = torch.Generator().manual_seed(1)
    x, y = torch.rand(64, 1, 14, 14, generator=gen), torch.randint(0, 10, (64,), generator=gen)
    both = train_family("group", 8, x, y, x, y, seeds=(5, 6), steps=5)
    assert both.shape == (2,)
    assert ((0 <= both) & (both <= 1)).all()


# --- optimisers ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "ours, theirs",
    [
        (lambda p: StackedSGD(p, 0.1, momentum=0.9), lambda p: torch.optim.SGD(p, 0.1, 0.9)),
        (lambda p: StackedAdam(p, 1e-2), lambda p: torch.optim.Adam(p, 1e-2)),
    ],
)
def test_stacked_optimisers_equal_torch_with_one_learning_rate(ours, theirs):
    torch.manual_seed(0)
    a = nn.Parameter(torch.randn(3, 4, dtype=torch.float64))
    b = nn.Parameter(a.detach().clone())
    opt_a, opt_b = ours([a]), theirs([b])
    for k in range(5):
        for p, opt in ((a, opt_a), (b, opt_b)):
            opt.zero_grad()
            ((p - k) ** 3).sum().backward()
            opt.step()
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_stacked_optimiser_errors():
    w = nn.Parameter(torch.ones(3, 2))
    with pytest.raises(ValueError, match="lr must be a float or S = 3 floats"):
        StackedSGD([w], [0.1, 0.2], n_models=3)
    with pytest.raises(ValueError, match="does not split"):
        StackedSGD([nn.Parameter(torch.ones(4))], [0.1, 0.2, 0.3])


# --- train_stacked: stacked == separate -----------------------------------------------------


def _train_separately(net, x, y, idx, opt_factory, steps):
    opt = opt_factory(net.parameters())
    net.train()
    for t in range(steps):
        loss = F.cross_entropy(net(x[idx[t]]), y[idx[t]])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net


@pytest.mark.parametrize(
    "optimizer, kwargs, factory",
    [
        ("sgd", {"momentum": 0.9}, lambda lr: lambda p: torch.optim.SGD(p, lr=lr, momentum=0.9)),
        ("adam", {"adam_eps": 1e-7}, lambda lr: lambda p: torch.optim.Adam(p, lr=lr, eps=1e-7)),
    ],
)
def test_stacked_training_equals_separate_training(optimizer, kwargs, factory):
    x, y = toy_data()
    lrs = [0.05, 0.01, 0.002] if optimizer == "sgd" else [1e-2, 3e-3, 1e-3]
    seeds = [3, 4, 5]
    net = stacked_mlp(3, (12, 8, 8, 4), norm="batch", residual=False)
    copies = [unstack(net, s) for s in range(3)]
    hist = train_stacked(
        net, x, y, x, y, steps=15, lr=lrs, seeds=seeds, batch_size=20, optimizer=optimizer, **kwargs
    )
    idx = batch_indices(len(x), 20, 15, seeds)
    net.eval()
    out = net(x)
    for s, single in enumerate(copies):
        _train_separately(single, x, y, idx[:, s], factory(lrs[s]), 15)
        single.eval()
        torch.testing.assert_close(single(x), out[s], atol=2e-5, rtol=1e-4)
    assert hist.eval_acc.shape == (3, 2) and not hist.diverged.any()


def test_stacked_training_with_wrapped_bnbook_norm_equals_fast_path():
    x, y = toy_data()
    torch.manual_seed(1)
    a = stacked_mlp(2, (12, 8, 4), norm="batch")
    torch.manual_seed(1)
    b = stacked_mlp(2, (12, 8, 4), norm=BatchNorm1d)
    ha = train_stacked(a, x, y, x, y, steps=10, lr=0.1, seeds=[0, 1], batch_size=30)
    hb = train_stacked(b, x, y, x, y, steps=10, lr=0.1, seeds=[0, 1], batch_size=30)
    np.testing.assert_allclose(ha.eval_loss, hb.eval_loss, atol=1e-5)


def test_history_records_and_divergence():
    x, y = toy_data()
    net = stacked_mlp(3, (12, 16, 4), init="he")
    hist = train_stacked(
        net, x, y, x, y, steps=20, lr=[0.01, 0.1, 1e4], seeds=[0, 1, 2], eval_every=5
    )
    np.testing.assert_array_equal(hist.steps, [0, 5, 10, 15, 20])
    assert hist.train_loss.shape == hist.eval_loss.shape == hist.eval_acc.shape == (3, 5)
    assert np.isnan(hist.train_loss[:, 0]).all() and np.isfinite(hist.train_loss[:2, 1:]).all()
    np.testing.assert_array_equal(hist.diverged, [False, False, True])
    assert hist.eval_loss[1, -1] < hist.eval_loss[1, 0]  # the sane network learns
    assert net.training


def test_train_stacked_errors():
    x, y = toy_data()
    net = stacked_mlp(2, (12, 4))
    with pytest.raises(ValueError, match="seeds must have one entry per network"):
        train_stacked(net, x, y, x, y, steps=1, lr=0.1, seeds=[0])
    with pytest.raises(ValueError, match="lr must be a float or S = 2 floats"):
        train_stacked(net, x, y, x, y, steps=1, lr=[0.1, 0.2, 0.3], seeds=[0, 1])
    with pytest.raises(ValueError, match="optimizer must be"):
        train_stacked(net, x, y, x, y, steps=1, lr=0.1, seeds=[0, 1], optimizer="rmsprop")


def test_evaluate_stacked_restores_mode():
    x, y = toy_data()
    net = stacked_mlp(2, (12, 4), norm="batch")
    net.train()
    loss, acc = evaluate(net, x, y)
    assert net.training and loss.shape == acc.shape == (2,)
    manual = F.cross_entropy(net.eval()(x)[1], y).item()
    assert loss[1] == pytest.approx(manual, rel=1e-6)


# --- helpers -------------------------------------------------------------------------------


def test_batch_indices_are_epoch_permutations():
    idx = batch_indices(10, 3, 7, seeds=[0, 1])
    assert idx.shape == (7, 2, 3)
    first_epoch = idx[:3, 0].ravel()  # 3 full batches per epoch, one sample left out
    assert len(set(first_epoch.tolist())) == 9
    assert not np.array_equal(idx[:, 0], idx[:, 1])
    np.testing.assert_array_equal(idx, batch_indices(10, 3, 7, seeds=[0, 1]))
    with pytest.raises(ValueError, match="batch_size must be in"):
        batch_indices(10, 11, 1, seeds=[0])


def test_evaluate_takes_one_input_per_stacked_network():
    torch.manual_seed(0)
    net = stacked_mlp(2, [6, 5, 3])
    x, y = torch.randn(2, 7, 6), torch.randint(0, 3, (7,))
    loss, acc = evaluate(net, x, y, batch_size=3)  # chunks of the samples' axis, 1 here
    for s in range(2):
        one_loss, one_acc = evaluate(unstack(net, s), x[s], y)
        assert abs(loss[s] - one_loss) < 1e-6 and abs(acc[s] - one_acc) < 1e-12
