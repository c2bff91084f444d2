"""A tiny Transformer encoder for CPU experiments on normalisation (chapter ``ch-beyond``).

Four placements of the normalisation, as in :cite:t:`xiong2020layer`:

* ``"post-ln"``: the original Transformer, ``h ← LN(h + F(h))`` after every sub-layer;
* ``"pre-ln"``: ``h ← h + F(LN(h))``, plus one LN before the read-out;
* ``"pre-rms"``: pre-LN with RMS normalisation (:func:`bnbook.norms.rms_norm`) instead of LN;
* ``"none"``: ``h ← h + F(h)``, no normalisation at all.

Every layer normalisation is the book's own (:func:`bnbook.norms.standardize` and
:func:`bnbook.norms.rms_norm`, hand-written backward passes), taken over each token's ``d_model``
features: nothing depends on the other tokens or on the batch.

To make several seeds cheap on a CPU, :class:`TinyTransformer` holds ``n_models`` independent
models at once: every parameter has a leading axis of that length and one batched product serves
all of them (as :mod:`bnbook.stacked` does for MLPs). Model ``s`` is initialised from its own
seed and draws its own data, so two models with the same seed and different learning-rate
schedules start from the same weights and see the same batches: a paired comparison.

The task, :func:`sort_task`, needs no download: read a sequence of digits and output it sorted,
one prediction per position (an encoder with no causal mask).

>>> import torch
>>> net = TinyTransformer(vocab=10, seq_len=8, norm="pre-rms", n_models=3, seeds=[0, 1, 2])
>>> net(torch.zeros(5, 8, dtype=torch.long)).shape   # (models, sequences, positions, classes)
torch.Size([3, 5, 8, 10])
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bnbook.norms import rms_norm, standardize

__all__ = [
    "NORMS",
    "sort_task",
    "warmup_factor",
    "TokenNorm",
    "StackedTokenLinear",
    "Block",
    "TinyTransformer",
    "TransformerRun",
    "train_transformer",
]

#: The normalisation placements :class:`TinyTransformer` knows.
NORMS: tuple[str, ...] = ("post-ln", "pre-ln", "pre-rms", "none")


def _check_positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def sort_task(
    n: int, seq_len: int = 8, vocab: int = 10, *, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """``n`` random sequences of digits and, as targets, the same sequences sorted.

    Parameters
    ----------
    n, seq_len, vocab : int
        Number of sequences, their length T, and the number of distinct tokens V.
    generator : torch.Generator
        The source of randomness (the task is reproducible from it alone).

    Returns
    -------
    x, y : Tensor of int64, shape (n, T) each

    >>> x, y = sort_task(2, 5, generator=torch.Generator().manual_seed(0))
    >>> bool((y[:, 1:] >= y[:, :-1]).all()), x.shape
    (True, torch.Size([2, 5]))
    """
    for name, value in (("n", n), ("seq_len", seq_len), ("vocab", vocab)):
        _check_positive_int(name, value)
    x = torch.randint(0, vocab, (n, seq_len), generator=generator)
    return x, x.sort(dim=1).values


def warmup_factor(step: int, warmup_steps: int) -> float:
    """The learning-rate multiplier at ``step`` (0-based): a linear warm-up, then 1.

    ``min(1, (step + 1) / warmup_steps)``; ``warmup_steps = 0`` means no warm-up (always 1).

    >>> [warmup_factor(t, 4) for t in range(6)], warmup_factor(0, 0)
    ([0.25, 0.5, 0.75, 1.0, 1.0, 1.0], 1.0)
    """
    if warmup_steps < 0 or step < 0:
        raise ValueError(f"step and warmup_steps must be >= 0, got {step} and {warmup_steps}")
    return 1.0 if warmup_steps == 0 else min(1.0, (step + 1) / warmup_steps)


class StackedTokenLinear(nn.Module):
    """``n_models`` independent ``nn.Linear(in_features, out_features)`` layers, applied per token.

    Shape
    -----
    Input (S, *, in_features), output (S, *, out_features). ``weight`` is
    (S, out_features, in_features), ``bias`` (S, 1, out_features); initialised like
    ``nn.Linear`` (uniform in ±1/sqrt(in_features)) by :meth:`TinyTransformer.reset_parameters`.
    """

    def __init__(self, n_models: int, in_features: int, out_features: int) -> None:
        super().__init__()
        self.n_models, self.in_features, self.out_features = n_models, in_features, out_features
        self.weight = nn.Parameter(torch.empty(n_models, out_features, in_features))
        self.bias = nn.Parameter(torch.empty(n_models, 1, out_features))

    def forward(self, x: Tensor) -> Tensor:
        s = x.shape[0]
        flat = x.reshape(s, -1, self.in_features)
        y = torch.baddbmm(self.bias, flat, self.weight.transpose(1, 2))
        return y.view(*x.shape[:-1], self.out_features)


class TokenNorm(nn.Module):
    """Layer norm (``kind="layer"``) or RMS norm (``kind="rms"``) of each token's features, with a
    separate elementwise scale (and, for layer norm, shift) for each of the ``n_models`` models.

    Parameters
    ----------
    n_models, d_model : int
    kind : {"layer", "rms"}
    eps : float
        1e-5 for both, so that the two differ only in the centring.

    Shape
    -----
    Input and output (S, *, d_model).
    """

    def __init__(self, n_models: int, d_model: int, kind: str, eps: float = 1e-5) -> None:
        super().__init__()
        if kind not in ("layer", "rms"):
            raise ValueError(f"kind must be 'layer' or 'rms', got {kind!r}")
        self.kind, self.d_model, self.eps = kind, d_model, eps
        self.weight = nn.Parameter(torch.ones(n_models, 1, d_model))
        if kind == "layer":
            self.bias = nn.Parameter(torch.zeros(n_models, 1, d_model))
        else:
            self.register_parameter("bias", None)

    def forward(self, x: Tensor) -> Tensor:
        s = x.shape[0]
        flat = x.reshape(s, -1, self.d_model)
        if self.kind == "layer":
            y = torch.addcmul(self.bias, standardize(flat, -1, self.eps), self.weight)
        else:
            y = rms_norm(flat, self.d_model, None, self.eps) * self.weight
        return y.view(x.shape)

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, d_model={self.d_model}, eps={self.eps}"


def _norm_or_none(norm: str, n_models: int, d_model: int) -> nn.Module | None:
    if norm == "none":
        return None
    return TokenNorm(n_models, d_model, "rms" if norm == "pre-rms" else "layer")


class Block(nn.Module):
    """One Transformer encoder layer: multi-head self-attention, then a ReLU feed-forward
    network, each inside a residual connection, with the normalisation placed as ``norm`` says
    (equation ``eq-beyond-placements``).

    Parameters
    ----------
    n_models, d_model, n_heads, d_ff : int
        S; the width; the number of heads (a divisor of ``d_model``); the feed-forward width.
    norm : str
        One of :data:`NORMS`.

    Shape
    -----
    Input and output (S, N, T, d_model).

    Raises
    ------
    ValueError
        ``n_heads`` does not divide ``d_model``.
    """

    def __init__(self, n_models: int, d_model: int, n_heads: int, d_ff: int, norm: str) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"n_heads={n_heads} must divide d_model={d_model}")
        self.norm, self.n_heads = norm, n_heads
        self.qkv = StackedTokenLinear(n_models, d_model, 3 * d_model)
        self.proj = StackedTokenLinear(n_models, d_model, d_model)
        self.ff1 = StackedTokenLinear(n_models, d_model, d_ff)
        self.ff2 = StackedTokenLinear(n_models, d_ff, d_model)
        self.norm1 = _norm_or_none(norm, n_models, d_model)
        self.norm2 = _norm_or_none(norm, n_models, d_model)

    def attention(self, h: Tensor) -> Tensor:
        s, n, t, d = h.shape
        q, k, v = self.qkv(h).view(s * n, t, 3, self.n_heads, d // self.n_heads).unbind(2)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        )
        return self.proj(out.transpose(1, 2).reshape(s, n, t, d))

    def feed_forward(self, h: Tensor) -> Tensor:
        return self.ff2(F.relu(self.ff1(h)))

    def forward(self, h: Tensor) -> Tensor:
        if self.norm == "post-ln":
            h = self.norm1(h + self.attention(h))
            return self.norm2(h + self.feed_forward(h))
        if self.norm == "none":
            h = h + self.attention(h)
            return h + self.feed_forward(h)
        h = h + self.attention(self.norm1(h))
        return h + self.feed_forward(self.norm2(h))


class TinyTransformer(nn.Module):
    """``n_models`` independent Transformer encoders that classify every position of a sequence.

    Token embedding (N(0, 1)) plus a learned position embedding (N(0, 0.02²)), ``n_layers``
    :class:`Block` s, for the pre-norm variants a final norm, and a linear read-out.

    Parameters
    ----------
    vocab, seq_len : int
        V tokens; sequences of length T.
    d_model, n_heads, n_layers, d_ff : int
        Width, attention heads, layers, and the hidden width of the feed-forward networks.
    norm : str
        One of :data:`NORMS`.
    n_models : int
        S, the number of independent models.
    seeds : sequence of S ints, or None
        Model ``s`` is initialised from ``seeds[s]`` (None: from torch's global generator).

    Shape
    -----
    Input tokens (N, T), shared by the models, or (S, N, T); output logits (S, N, T, V).

    Raises
    ------
    ValueError
        An unknown ``norm``, a size that is not a positive int, ``n_heads`` not dividing
        ``d_model``, or ``seeds`` of the wrong length.
    """

    def __init__(
        self,
        vocab: int,
        seq_len: int,
        *,
        d_model: int = 32,
        n_heads: int = 2,
        n_layers: int = 3,
        d_ff: int = 64,
        norm: str = "pre-ln",
        n_models: int = 1,
        seeds: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
        for name, value in (
            ("vocab", vocab),
            ("seq_len", seq_len),
            ("d_model", d_model),
            ("n_heads", n_heads),
            ("n_layers", n_layers),
            ("d_ff", d_ff),
            ("n_models", n_models),
        ):
            _check_positive_int(name, value)
        self.norm, self.n_models, self.vocab, self.seq_len = norm, n_models, vocab, seq_len
        s = n_models
        self.embed = nn.Parameter(torch.empty(s, vocab, d_model))
        self.pos = nn.Parameter(torch.empty(s, seq_len, d_model))
        self.blocks = nn.ModuleList(Block(s, d_model, n_heads, d_ff, norm) for _ in range(n_layers))
        self.final_norm = None if norm in ("post-ln", "none") else _norm_or_none(norm, s, d_model)
        self.readout = StackedTokenLinear(s, d_model, vocab)
        self.reset_parameters(seeds)

    def reset_parameters(self, seeds: Sequence[int] | None = None) -> None:
        """Draw every model's parameters; model ``s`` from ``torch.Generator().manual_seed(seeds[s])``.

        Linear layers as ``nn.Linear`` (weight and bias uniform in ±1/sqrt(fan_in)); norm scales
        1 and shifts 0.
        """
        if seeds is not None and len(seeds) != self.n_models:
            raise ValueError(
                f"seeds must hold one seed per model (n_models = {self.n_models}), got {len(seeds)}"
            )
        for s in range(self.n_models):
            gen = None if seeds is None else torch.Generator().manual_seed(int(seeds[s]))
            with torch.no_grad():
                self.embed[s].normal_(0.0, 1.0, generator=gen)
                self.pos[s].normal_(0.0, 0.02, generator=gen)
                for m in self.modules():
                    if isinstance(m, StackedTokenLinear):
                        bound = 1.0 / math.sqrt(m.in_features)
                        m.weight[s].uniform_(-bound, bound, generator=gen)
                        m.bias[s].uniform_(-bound, bound, generator=gen)
                    elif isinstance(m, TokenNorm):
                        m.weight[s].fill_(1.0)
                        if m.bias is not None:
                            m.bias[s].zero_()

    def forward(self, tokens: Tensor) -> Tensor:
        s = self.n_models
        if tokens.dim() == 2:
            tokens = tokens.expand(s, *tokens.shape)
        if tokens.dim() != 3 or tokens.shape[0] != s or tokens.shape[2] != self.seq_len:
            raise ValueError(
                f"tokens must have shape (N, {self.seq_len}) or ({s}, N, {self.seq_len}), "
                f"got {tuple(tokens.shape)}"
            )
        rows = torch.arange(s, device=tokens.device).view(s, 1, 1)
        h = self.embed[rows, tokens] + self.pos.unsqueeze(1)  # (S, N, T, d)
        for block in self.blocks:
            h = block(h)
        if self.final_norm is not None:
            h = self.final_norm(h)
        return self.readout(h)


class TransformerRun(NamedTuple):
    """What :func:`train_transformer` returns, one row per model.

    Attributes
    ----------
    train_loss : ndarray (S, steps)
        Each step's mini-batch cross-entropy (NaN or inf once a model has diverged).
    eval_loss, token_acc, seq_acc : ndarray (S,)
        After training, on the evaluation set: loss, fraction of positions right, fraction of
        sequences entirely right.
    """

    train_loss: np.ndarray
    eval_loss: np.ndarray
    token_acc: np.ndarray
    seq_acc: np.ndarray


def _data_generator(seed: int) -> torch.Generator:
    # A stream independent of the initialisation stream of the same seed.
    state = np.random.SeedSequence([int(seed), 1]).generate_state(1)[0]
    return torch.Generator().manual_seed(int(state))


def _sequence_loss(logits: Tensor, target: Tensor) -> Tensor:
    """Mean cross-entropy over a batch of sequences, one value per model: (S,)."""
    s, vocab = logits.shape[0], logits.shape[-1]
    loss = F.cross_entropy(logits.reshape(-1, vocab), target.reshape(-1), reduction="none")
    return loss.view(s, -1).mean(1)


class _WarmupAdam:
    """Adam (PyTorch's formula) with one peak learning rate and one linear warm-up per model."""

    def __init__(self, params, lrs, warmups, betas, eps) -> None:
        self.params, self.lrs, self.warmups = params, lrs, warmups
        self.betas, self.eps, self.t = betas, eps, 0
        self.m1 = [torch.zeros_like(p) for p in params]
        self.m2 = [torch.zeros_like(p) for p in params]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        (b1, b2), t, s = self.betas, self.t, len(self.lrs)
        factors = [warmup_factor(t, int(w)) for w in self.warmups]
        p0 = self.params[0]
        step_size = torch.tensor(self.lrs * np.asarray(factors), dtype=p0.dtype, device=p0.device)
        c1, c2 = 1 - b1 ** (t + 1), 1 - b2 ** (t + 1)
        for p, a, b in zip(self.params, self.m1, self.m2, strict=True):
            a.lerp_(p.grad, 1 - b1)
            b.mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
            update = (a / c1) / ((b / c2).sqrt_() + self.eps)
            p.sub_(update * step_size.view(s, *([1] * (p.dim() - 1))))
        self.t += 1


def train_transformer(
    model: TinyTransformer,
    x_eval: Tensor,
    y_eval: Tensor,
    *,
    steps: int,
    lr: float | Sequence[float],
    warmup: int | Sequence[int],
    seeds: Sequence[int],
    batch_size: int = 32,
    betas: tuple[float, float] = (0.9, 0.98),
    adam_eps: float = 1e-9,
) -> TransformerRun:
    """Train the ``S`` models of ``model`` on :func:`sort_task` with Adam, each on its own data.

    Model ``s`` uses peak learning rate ``lr[s]`` with a linear warm-up over ``warmup[s]`` steps
    (:func:`warmup_factor`; 0 = none) and draws its batches from a generator derived from
    ``seeds[s]``. Adam follows PyTorch's formula with the Transformer's β = (0.9, 0.98)
    (:cite:t:`vaswani2017attention`), one learning rate per model; the loss is the sum of the
    models' mean cross-entropies, so each model gets the gradient of its own loss. There is no
    gradient clipping.

    Parameters
    ----------
    model : TinyTransformer
        Trained in place; evaluated at the end (it has no batch-dependent layer, so training and
        evaluation compute the same function).
    x_eval, y_eval : Tensor (M, T)
        The evaluation sequences and their targets, shared by all models.
    steps, batch_size : int
    lr : float or sequence of S floats
    warmup : int or sequence of S ints
    seeds : sequence of S ints

    Returns
    -------
    TransformerRun

    Raises
    ------
    ValueError
        ``lr``, ``warmup`` or ``seeds`` of a length other than S.
    """
    from bnbook.train import fit  # noqa: PLC0415 (bnbook.train does not import this module)

    s = model.n_models
    lrs = np.broadcast_to(np.asarray(lr, dtype=np.float64), (s,)).copy()
    warmups = np.broadcast_to(np.asarray(warmup, dtype=np.int64), (s,)).copy()
    if len(seeds) != s:
        raise ValueError(f"seeds must hold one seed per model (S = {s}), got {len(seeds)}")
    _check_positive_int("steps", steps)
    t_len, vocab = model.seq_len, model.vocab
    data = [
        sort_task(steps * batch_size, t_len, vocab, generator=_data_generator(seed))
        for seed in seeds
    ]
    xs = torch.stack([x.view(steps, batch_size, t_len) for x, _ in data], dim=1)  # (steps, S, B, T)
    ys = torch.stack([y.view(steps, batch_size, t_len) for _, y in data], dim=1)
    device = next(model.parameters()).device  # drawn on the CPU (reproducibly), moved once
    xs, ys = xs.to(device), ys.to(device)
    opt = _WarmupAdam(list(model.parameters()), lrs, warmups, betas, adam_eps)
    history = fit(model, zip(xs, ys, strict=True), opt, steps=steps, loss=_sequence_loss)
    model.eval()
    with torch.no_grad():
        logits = model(x_eval)
        ce = F.cross_entropy(
            logits.reshape(-1, vocab), y_eval.expand(s, *y_eval.shape).reshape(-1), reduction="none"
        )
        right = logits.argmax(-1) == y_eval
    return TransformerRun(
        train_loss=history.batch_loss,
        eval_loss=ce.view(s, -1).mean(1).cpu().numpy().astype(np.float64),
        token_acc=right.double().mean((1, 2)).cpu().numpy(),
        seq_acc=right.all(-1).double().mean(1).cpu().numpy(),
    )
