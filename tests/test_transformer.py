"""Tests of bnbook.transformer: the task, the schedule, the norm placements, independence of the
stacked models, and the training loop."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bnbook.transformer as T

F64 = torch.float64


def _tokens(n=6, seed=0):
    return T.sort_task(n, 8, 10, generator=torch.Generator().manual_seed(seed))


def test_sort_task_targets_are_the_sorted_inputs():
    x, y = T.sort_task(50, 7, 5, generator=torch.Generator().manual_seed(1))
    assert x.shape == y.shape == (50, 7) and x.dtype == torch.int64
    assert bool((y[:, 1:] >= y[:, :-1]).all())
    assert torch.equal(x.sort(1).values, y) and not torch.equal(x, y)
    assert int(x.min()) >= 0 and int(x.max()) <= 4
    x2, _ = T.sort_task(50, 7, 5, generator=torch.Generator().manual_seed(1))
    assert torch.equal(x, x2)
    with pytest.raises(ValueError, match="seq_len"):
        T.sort_task(3, 0, generator=torch.Generator())


def test_warmup_factor():
    assert [T.warmup_factor(t, 4) for t in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    assert T.warmup_factor(0, 0) == 1.0 == T.warmup_factor(100, 0)
    with pytest.raises(ValueError, match="warmup_steps"):
        T.warmup_factor(0, -1)


@pytest.mark.parametrize("norm", T.NORMS)
def test_stacked_model_equals_the_single_model_of_the_same_seed(norm):
    x, _ = _tokens()
    stacked = T.TinyTransformer(10, 8, norm=norm, n_models=3, seeds=[5, 6, 7])
    single = T.TinyTransformer(10, 8, norm=norm, n_models=1, seeds=[6])
    torch.testing.assert_close(stacked(x)[1], single(x)[0], atol=1e-6, rtol=1e-6)
    assert not torch.allclose(stacked(x)[0], stacked(x)[1])


@pytest.mark.parametrize("norm", T.NORMS)
def test_stacked_models_do_not_share_gradients(norm):
    x, y = _tokens()
    net = T.TinyTransformer(10, 8, norm=norm, n_models=3, seeds=[0, 1, 2])
    F.cross_entropy(net(x)[0].reshape(-1, 10), y.reshape(-1)).backward()
    for name, p in net.named_parameters():
        assert p.grad[1:].abs().max() == 0, name
        assert p.grad[0].abs().max() > 0 or "bias" in name, name


def _block_outputs(net, x):
    seen = []
    for block in net.blocks:
        block.register_forward_hook(lambda m, i, o: seen.append(o))
    net(x)
    return seen


def test_post_ln_standardises_every_token_after_every_block():
    x, _ = _tokens()
    net = T.TinyTransformer(10, 8, norm="post-ln", n_models=2, seeds=[0, 1])
    for h in _block_outputs(net, x):  # scale 1 and shift 0 at initialisation
        torch.testing.assert_close(h.mean(-1), torch.zeros(h.shape[:-1]), atol=1e-5, rtol=0)
        var = h.var(-1, unbiased=False)
        torch.testing.assert_close(var, torch.ones_like(var), atol=1e-3, rtol=0)


def test_norm_placements_build_the_right_layers():
    kinds = {}
    for norm in T.NORMS:
        net = T.TinyTransformer(10, 8, norm=norm, n_layers=2, seeds=[0])
        kinds[norm] = [m.kind for m in net.modules() if isinstance(m, T.TokenNorm)]
    assert kinds["post-ln"] == ["layer"] * 4  # two per block, no final norm
    assert kinds["pre-ln"] == ["layer"] * 5  # two per block and one before the read-out
    assert kinds["pre-rms"] == ["rms"] * 5
    assert kinds["none"] == []
    x, _ = _tokens()
    pre = T.TinyTransformer(10, 8, norm="pre-ln", n_models=1, seeds=[3])
    for h in _block_outputs(pre, x):  # the residual stream itself is not normalised
        assert (h.var(-1, unbiased=False) - 1).abs().max() > 0.1


@pytest.mark.parametrize("kind", ["layer", "rms"])
def test_token_norm_matches_torch_per_model(kind):
    gen = torch.Generator().manual_seed(0)
    norm = T.TokenNorm(2, 6, kind).double()
    with torch.no_grad():
        for p in norm.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=F64))
    x = torch.randn(2, 3, 4, 6, generator=gen, dtype=F64) * 3 + 1
    y = norm(x)
    for s in range(2):
        if kind == "layer":
            ref = F.layer_norm(x[s], (6,), norm.weight[s, 0], norm.bias[s, 0], 1e-5)
        else:
            ref = F.rms_norm(x[s], (6,), norm.weight[s, 0], 1e-5)
        torch.testing.assert_close(y[s], ref, atol=1e-12, rtol=0)


def test_training_is_deterministic_and_paired_slots_agree():
    xe, ye = _tokens(40, seed=9)
    runs = []
    for _ in range(2):
        net = T.TinyTransformer(10, 8, n_layers=1, n_models=3, seeds=[4, 4, 5])
        runs.append(T.train_transformer(net, xe, ye, steps=5, lr=3e-3, warmup=0, seeds=[4, 4, 5]))
    np.testing.assert_array_equal(runs[0].train_loss, runs[1].train_loss)
    np.testing.assert_allclose(runs[0].train_loss[0], runs[0].train_loss[1], rtol=1e-6)
    assert not np.allclose(runs[0].train_loss[0], runs[0].train_loss[2])
    assert runs[0].token_acc.shape == runs[0].seq_acc.shape == (3,)


def test_first_adam_step_moves_each_parameter_by_the_warmed_up_learning_rate():
    # Adam's first step is lr · g/|g| elementwise, so |Δp| = lr · warmup_factor(0, w).
    xe, ye = _tokens(10)
    lr = 1e-2
    net = T.TinyTransformer(10, 8, n_layers=1, n_models=2, seeds=[0, 1])
    before = [p.detach().clone() for p in net.parameters()]
    T.train_transformer(net, xe, ye, steps=1, lr=lr, warmup=[0, 4], seeds=[0, 1])
    for p, q in zip(net.parameters(), before, strict=True):
        step = (p.detach() - q).abs()
        assert step[0].max() == pytest.approx(lr, rel=1e-4)
        assert step[1].max() == pytest.approx(lr / 4, rel=1e-4)


def test_a_few_steps_lower_the_loss():
    xe, ye = _tokens(200, seed=3)
    net = T.TinyTransformer(10, 8, n_layers=1, n_models=2, seeds=[0, 1])
    run = T.train_transformer(net, xe, ye, steps=40, lr=3e-3, warmup=5, seeds=[0, 1])
    assert (run.train_loss[:, -5:].mean(1) < run.train_loss[:, :5].mean(1) - 0.2).all()


def test_errors():
    with pytest.raises(ValueError, match="norm must be"):
        T.TinyTransformer(10, 8, norm="batch")
    with pytest.raises(ValueError, match="n_heads"):
        T.TinyTransformer(10, 8, d_model=30, n_heads=4)
    with pytest.raises(ValueError, match="seeds"):
        T.TinyTransformer(10, 8, n_models=2, seeds=[0])
    with pytest.raises(ValueError, match="tokens must have shape"):
        T.TinyTransformer(10, 8)(torch.zeros(2, 7, dtype=torch.long))
    with pytest.raises(ValueError, match="kind"):
        T.TokenNorm(1, 4, "batch")
    xe, ye = _tokens()
    with pytest.raises(ValueError, match="seeds"):
        T.train_transformer(
            T.TinyTransformer(10, 8, n_models=2), xe, ye, steps=1, lr=1e-3, warmup=0, seeds=[0]
        )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_trains_on_cuda():
    dev = torch.device("cuda")
    xe, ye = (t.to(dev) for t in _tokens(20))
    net = T.TinyTransformer(10, 8, n_layers=1, n_models=2, seeds=[0, 1]).to(dev)
    run = T.train_transformer(net, xe, ye, steps=3, lr=1e-3, warmup=2, seeds=[0, 1])
    assert np.isfinite(run.train_loss).all()


def test_module_is_a_torch_module():
    assert isinstance(T.TinyTransformer(10, 8), nn.Module)
