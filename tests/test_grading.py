"""bnbook.grading: every grader passes the reference answer and names each common mistake."""

from __future__ import annotations

import numpy as np
import pytest

from bnbook import grading

# --- reference answers (what a student should write) -------------------------------------------


def forward(x, gamma, beta, eps=1e-5):
    mu = x.mean(axis=0)
    xc = x - mu
    var = (xc**2).mean(axis=0)
    inv_std = 1.0 / np.sqrt(var + eps)
    x_hat = xc * inv_std
    return gamma * x_hat + beta, (x_hat, inv_std, gamma)


def backward(dy, cache):
    x_hat, inv_std, gamma = cache
    m = dy.shape[0]
    dbeta = dy.sum(axis=0)
    dgamma = (dy * x_hat).sum(axis=0)
    return (gamma * inv_std / m) * (m * dy - dbeta - x_hat * dgamma), dgamma, dbeta


def running(mean, var, x, momentum):
    m = x.shape[0]
    return (
        (1 - momentum) * mean + momentum * x.mean(axis=0),
        (1 - momentum) * var + momentum * x.var(axis=0) * m / (m - 1),
    )


def spatial(x, gamma, beta, eps=1e-5):
    n, c, h, w = x.shape
    table = x.transpose(0, 2, 3, 1).reshape(-1, c)
    y, _ = forward(table, gamma, beta, eps)
    return y.reshape(n, h, w, c).transpose(0, 3, 1, 2)


def standardize(x, axes, eps=1e-5):
    mean = x.mean(axis=axes, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=axes, keepdims=True)
    return (x - mean) / np.sqrt(var + eps)


def test_reference_answers_pass(capsys):
    grading.check_batch_norm_forward(forward)
    grading.check_batch_norm_forward(lambda *a, **k: forward(*a, **k)[0])  # y alone is fine too
    grading.check_batch_norm_backward(forward, backward)
    grading.check_running_statistics(running)
    grading.check_spatial_batch_norm(spatial)
    grading.check_standardize(standardize)
    out = capsys.readouterr().out
    assert out.count("cases passed") == 6


# --- typical wrong answers, each with the diagnosis it must produce ------------------------------


def fwd_unbiased(x, gamma, beta, eps=1e-5):
    return gamma * (x - x.mean(0)) / np.sqrt(x.var(0, ddof=1) + eps) + beta


def fwd_eps_outside(x, gamma, beta, eps=1e-5):
    return gamma * (x - x.mean(0)) / (x.std(0) + eps) + beta


def fwd_rows(x, gamma, beta, eps=1e-5):
    mu, var = x.mean(1, keepdims=True), x.var(1, keepdims=True)
    return gamma * (x - mu) / np.sqrt(var + eps) + beta


def fwd_no_affine(x, gamma, beta, eps=1e-5):
    return (x - x.mean(0)) / np.sqrt(x.var(0) + eps)


def fwd_mutates(x, gamma, beta, eps=1e-5):
    x -= x.mean(0)
    return gamma * x / np.sqrt((x**2).mean(0) + eps) + beta


@pytest.mark.parametrize(
    ("wrong", "message"),
    [
        (fwd_unbiased, "divides by m − 1"),
        (fwd_eps_outside, "inside the square root"),
        (fwd_rows, "over axis 0"),
        (fwd_no_affine, "γ and β are not applied"),
        (fwd_mutates, "modified its argument number 1"),
    ],
)
def test_forward_mistakes_are_named(wrong, message):
    with pytest.raises(grading.GradingError, match=message):
        grading.check_batch_norm_forward(wrong)


def bwd_mean_dgamma(dy, cache):
    dx, dgamma, dbeta = backward(dy, cache)
    return dx, dgamma / dy.shape[0], dbeta


def bwd_mean_dbeta(dy, cache):
    dx, dgamma, dbeta = backward(dy, cache)
    return dx, dgamma, dbeta / dy.shape[0]


def bwd_constants(dy, cache):
    x_hat, inv_std, gamma = cache
    _, dgamma, dbeta = backward(dy, cache)
    return gamma * inv_std * dy, dgamma, dbeta


def bwd_no_variance_path(dy, cache):
    x_hat, inv_std, gamma = cache
    _, dgamma, dbeta = backward(dy, cache)
    return gamma * inv_std * (dy - dy.mean(0)), dgamma, dbeta


def bwd_no_gamma(dy, cache):
    x_hat, inv_std, gamma = cache
    dx, dgamma, dbeta = backward(dy, (x_hat, inv_std, np.ones_like(gamma)))
    return dx, dgamma, dbeta


@pytest.mark.parametrize(
    ("wrong", "message"),
    [
        (bwd_mean_dgamma, "dγ is off by a factor of m = 16: did you average"),
        (bwd_mean_dbeta, "dβ is off by a factor of m = 16"),
        (bwd_constants, "treats μ and σ² as constants"),
        (bwd_no_variance_path, "missing the path through σ²"),
        (bwd_no_gamma, "forgets the factor γ"),
    ],
)
def test_backward_mistakes_are_named(wrong, message):
    with pytest.raises(grading.GradingError, match=message):
        grading.check_batch_norm_backward(forward, wrong)


def test_backward_reports_a_wrong_forward_first():
    with pytest.raises(grading.GradingError, match="forward pass is wrong"):
        grading.check_batch_norm_backward(
            lambda x, g, b, eps=1e-5: (fwd_unbiased(x, g, b, eps), None), backward
        )


def run_keras_momentum(mean, var, x, a):
    m = x.shape[0]
    return a * mean + (1 - a) * x.mean(0), a * var + (1 - a) * x.var(0) * m / (m - 1)


def run_biased(mean, var, x, a):
    return (1 - a) * mean + a * x.mean(0), (1 - a) * var + a * x.var(0)


def run_std(mean, var, x, a):
    return (1 - a) * mean + a * x.mean(0), (1 - a) * var + a * x.std(0, ddof=1)


def run_no_average(mean, var, x, a):
    return x.mean(0), x.var(0, ddof=1)


@pytest.mark.parametrize(
    ("wrong", "message"),
    [
        (run_keras_momentum, "weight of the new batch statistic"),
        (run_biased, "unbiased batch variance"),
        (run_std, "not standard deviations"),
        (run_no_average, "not averaged"),
    ],
)
def test_running_statistics_mistakes_are_named(wrong, message):
    with pytest.raises(grading.GradingError, match=message):
        grading.check_running_statistics(wrong)


def sp_per_position(x, gamma, beta, eps=1e-5):
    g, b = gamma.reshape(1, -1, 1, 1), beta.reshape(1, -1, 1, 1)
    return g * (x - x.mean(0)) / np.sqrt(x.var(0) + eps) + b


def sp_per_image(x, gamma, beta, eps=1e-5):
    g, b = gamma.reshape(1, -1, 1, 1), beta.reshape(1, -1, 1, 1)
    mu, var = x.mean((2, 3), keepdims=True), x.var((2, 3), keepdims=True)
    return g * (x - mu) / np.sqrt(var + eps) + b


def sp_bad_reshape(x, gamma, beta, eps=1e-5):
    y, _ = forward(x.reshape(-1, x.shape[1]), gamma, beta, eps)
    return y.reshape(x.shape)


@pytest.mark.parametrize(
    ("wrong", "message"),
    [
        (sp_per_position, "statistics per position"),
        (sp_per_image, "instance norm"),
        (sp_bad_reshape, "mixes channels"),
    ],
)
def test_spatial_mistakes_are_named(wrong, message):
    with pytest.raises(grading.GradingError, match=message):
        grading.check_spatial_batch_norm(wrong)


def st_unbiased(x, axes, eps=1e-5):
    return (x - x.mean(axis=axes, keepdims=True)) / np.sqrt(
        x.var(axis=axes, keepdims=True, ddof=1) + eps
    )


def st_no_keepdims(x, axes, eps=1e-5):
    return (x - x.mean(axis=axes)) / np.sqrt(x.var(axis=axes) + eps)


def st_eps_outside(x, axes, eps=1e-5):
    return (x - x.mean(axis=axes, keepdims=True)) / (x.std(axis=axes, keepdims=True) + eps)


@pytest.mark.parametrize(
    ("wrong", "message"),
    [
        (st_unbiased, "count minus one"),
        (st_no_keepdims, "keepdims=True"),
        (st_eps_outside, "inside the square root"),
    ],
)
def test_standardize_mistakes_are_named(wrong, message):
    with pytest.raises(grading.GradingError, match=message):
        grading.check_standardize(wrong)


def test_a_wrong_answer_that_matches_no_known_mistake_still_fails():
    with pytest.raises(grading.GradingError, match="largest difference"):
        grading.check_batch_norm_forward(lambda x, g, b, eps=1e-5: forward(x, g, b, eps)[0] + 0.01)
