"""One contract for every normalisation layer of the package.

The batch-norm-like layers are found programmatically: every public subclass of
:class:`bnbook.torch._NormBase` in any module of ``bnbook``, so a new one is checked without being
listed here. Each must

* construct from torch's positional arguments (num_features, eps, momentum, affine,
  track_running_stats), its extras keyword-only;
* exchange state dicts with the matching ``torch.nn`` module, both ways, strictly;
* have working ``reset_parameters`` and ``reset_running_stats``;
* raise, for the same fault (wrong rank, wrong channel count, one value per channel in training,
  integer input), the same exception type as the package's batch-norm twin;
* in evaluation, equal the affine map of :func:`bnbook.fusion.inference_affine` (when
  :func:`bnbook.fusion.is_batch_norm` says it is one) and be folded by :func:`bnbook.fusion.fold_bn`
  after a Linear and after a convolution.

LayerNorm, RMSNorm and GroupNorm keep no running statistics; the checks that apply to them (state
dicts, ``reset_parameters``, the same error types, never folded) run on them too.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest
import torch
from torch import nn

import bnbook
import bnbook.norms as N
import bnbook.torch as bt
from bnbook.fusion import fold_bn, inference_affine, is_batch_norm

C = 4
D = torch.float64
#: values for the keyword-only arguments a layer requires
REQUIRED_KEYWORDS = {"ghost_batch_size": 2, "batch_size": 4}


def _all_subclasses(cls: type) -> set[type]:
    found = set()
    for sub in cls.__subclasses__():
        found |= {sub} | _all_subclasses(sub)
    return found


def _norm_layers() -> list[type]:
    for info in pkgutil.iter_modules(bnbook.__path__, "bnbook."):
        try:
            importlib.import_module(info.name)
        except ImportError:  # an optional dependency missing: nothing of it to check
            continue
    classes = [c for c in _all_subclasses(bt._NormBase) if c.__module__.startswith("bnbook.")]
    return sorted((c for c in classes if not c.__name__.startswith("_")), key=lambda c: c.__name__)


LAYERS = _norm_layers()


def _rank(cls: type) -> int:
    """The input rank to test ``cls`` with: its last allowed one, 4 for any rank."""
    return cls._input_dims[-1] if cls._input_dims else 4


def _make(cls: type, **kwargs) -> nn.Module:
    params = inspect.signature(cls.__init__).parameters.values()
    required = {
        p.name: REQUIRED_KEYWORDS[p.name]
        for p in params
        if p.kind is p.KEYWORD_ONLY and p.default is p.empty
    }
    # torch's positional order: num_features, eps, momentum, affine, track_running_stats
    return cls(C, 1e-5, 0.1, True, True, dtype=D, **required, **kwargs)


def _torch_twin(cls: type, rank: int) -> nn.Module:
    k = max(rank - 2, 1)
    if "Instance" in cls.__name__:
        return getattr(nn, f"InstanceNorm{k}d")(C, affine=True, track_running_stats=True, dtype=D)
    return getattr(nn, f"BatchNorm{k}d")(C, dtype=D)


def _input(rank: int, n: int = 8, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return 2.0 + 3.0 * torch.randn((n, C) + (3,) * (rank - 2), generator=gen, dtype=D)


def _trained(cls: type) -> nn.Module:
    layer = _make(cls)
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.uniform_(-0.5, 0.5)
    for step in range(3):
        layer(_input(_rank(cls), seed=step))
    return layer.eval()


def test_the_family_is_found():
    names = {c.__name__ for c in LAYERS}
    assert {"BatchNorm2d", "GhostBatchNorm1d", "BatchRenorm2d", "SyncBatchNorm"} <= names
    assert {"BatchLayerNorm", "FullNormSketch", "InstanceNorm2d"} <= names


@pytest.mark.parametrize("cls", LAYERS, ids=lambda c: c.__name__)
def test_state_dict_loads_into_torch_and_back(cls):
    ours, ref = _trained(cls), _torch_twin(cls, _rank(cls))
    assert set(ours.state_dict()) == set(ref.state_dict())
    ref.load_state_dict(ours.state_dict())
    fresh = _make(cls)
    fresh.load_state_dict(ref.state_dict())
    for key, value in ours.state_dict().items():
        torch.testing.assert_close(fresh.state_dict()[key], value, rtol=0, atol=0)


@pytest.mark.parametrize("cls", LAYERS, ids=lambda c: c.__name__)
def test_reset_parameters_and_running_stats(cls):
    layer = _trained(cls)
    assert not bool((layer.running_var == 1).all())  # training moved them: the reset can fail
    layer.reset_running_stats()
    assert bool((layer.running_mean == 0).all()) and bool((layer.running_var == 1).all())
    assert int(layer.num_batches_tracked) == 0
    assert not bool((layer.weight == 1).all())
    layer.reset_parameters()
    assert bool((layer.weight == 1).all()) and bool((layer.bias == 0).all())


def _faults(rank: int, any_rank: bool) -> dict[str, torch.Tensor]:
    return {
        "wrong rank": torch.randn(8, dtype=D)
        if any_rank
        else torch.randn((8, C) + (3,) * (rank - 1)),
        "wrong channels": torch.randn((8, C + 1) + (3,) * (rank - 2), dtype=D),
        "one value per channel": torch.randn((1, C) + (1,) * (rank - 2), dtype=D),
        "integer input": torch.ones((8, C) + (3,) * (rank - 2), dtype=torch.long),
    }


def _raised(layer: nn.Module, x: torch.Tensor) -> type:
    with pytest.raises(Exception) as info:
        layer(x)
    return info.type


@pytest.mark.parametrize(
    "fault", ["wrong rank", "wrong channels", "one value per channel", "integer input"]
)
@pytest.mark.parametrize("cls", LAYERS, ids=lambda c: c.__name__)
def test_same_fault_same_error_type(cls, fault):
    rank = _rank(cls)
    x = _faults(rank, not cls._input_dims)[fault]
    twin = getattr(bt, f"BatchNorm{max(rank - 2, 1)}d")(C, dtype=D)
    assert _raised(_make(cls), x) is _raised(twin, x)


@pytest.mark.parametrize("cls", LAYERS, ids=lambda c: c.__name__)
def test_eval_is_the_folded_affine_map(cls):
    layer = _trained(cls)
    x = _input(_rank(cls), seed=9)
    if not is_batch_norm(layer):  # evaluation mixes in per-sample statistics: no fixed map
        assert not getattr(cls, "eval_is_affine", True)
        return
    scale, shift = inference_affine(layer)
    view = (1, C) + (1,) * (x.dim() - 2)
    torch.testing.assert_close(
        layer(x), x * scale.view(view) + shift.view(view), rtol=0, atol=1e-12
    )


def _before(rank: int) -> nn.Module:
    if rank == 2:
        return nn.Linear(3, C, dtype=D)
    return getattr(nn, f"Conv{rank - 2}d")(2, C, 3, padding=1, dtype=D)


@pytest.mark.parametrize("cls", LAYERS, ids=lambda c: c.__name__)
def test_fold_bn_folds_it_after_linear_and_conv(cls):
    ranks = set(cls._input_dims or (2, 4)) & {2, 3, 4, 5}
    if 2 not in ranks and not cls._input_dims:
        ranks.add(2)
    for rank in sorted({min(ranks), max(ranks)}):
        model = nn.Sequential(_before(rank), _trained(cls)).eval()
        x = torch.randn((5, 3) if rank == 2 else (5, 2) + (4,) * (rank - 2), dtype=D)
        folded = fold_bn(model)
        foldable = is_batch_norm(model[1])
        assert isinstance(folded[1], nn.Identity) is foldable
        assert foldable is getattr(cls, "eval_is_affine", True)
        torch.testing.assert_close(folded(x), model(x), rtol=1e-9, atol=1e-9)


# --------------------------------------------------------------------------------------------
# The layers without running statistics
# --------------------------------------------------------------------------------------------

PLAIN = {
    "LayerNorm": (
        lambda: N.LayerNorm((C, 3, 3), dtype=D),
        lambda: nn.LayerNorm((C, 3, 3), dtype=D),
    ),
    "RMSNorm": (lambda: N.RMSNorm((C, 3, 3), dtype=D), lambda: nn.RMSNorm((C, 3, 3), dtype=D)),
    "GroupNorm": (lambda: N.GroupNorm(2, C, dtype=D), lambda: nn.GroupNorm(2, C, dtype=D)),
}


@pytest.mark.parametrize("name", PLAIN)
def test_plain_norms_state_dict_reset_and_never_folded(name):
    make_ours, make_ref = PLAIN[name]
    ours, ref = make_ours(), make_ref()
    with torch.no_grad():
        for p in ours.parameters():
            p.uniform_(0.5, 1.5)
    ref.load_state_dict(ours.state_dict())
    ours.load_state_dict(ref.state_dict())
    x = _input(4)
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-9, atol=1e-9)
    ours.reset_parameters()
    assert all(bool((p == 1).all()) for n, p in ours.named_parameters() if n == "weight")
    assert not is_batch_norm(ours)
    conv = nn.Conv2d(2, C, 3, padding=1, dtype=D)
    assert not isinstance(fold_bn(nn.Sequential(conv, ours).eval())[1], nn.Identity)


@pytest.mark.parametrize("name", PLAIN)
def test_plain_norms_integer_input_raises_the_twins_error(name):
    x = torch.ones(8, C, 3, 3, dtype=torch.long)
    assert _raised(PLAIN[name][0](), x) is _raised(bt.BatchNorm2d(C), x)


def test_group_norm_wrong_channels_raises_the_twins_error():
    x = torch.randn(8, C + 2, 3, 3, dtype=D)
    assert _raised(N.GroupNorm(2, C, dtype=D), x) is _raised(bt.BatchNorm2d(C, dtype=D), x)
