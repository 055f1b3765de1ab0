"""Triton kernels against their torch references (Liger-Kernel style: dtypes x awkward shapes).

Without a GPU the kernels run on CPU tensors through Triton's interpreter. ``@triton.jit``
reads ``TRITON_INTERPRET`` when a function is *defined*, and that includes triton's own
``triton.language`` helpers (``tl.zeros``, ``tl.max``, ...), defined when triton is first
imported. So the variable must be set before anything imports triton; here it is set before
this module imports it. When the whole suite runs, an earlier test module has usually
imported triton already (``torch._dynamo`` does, whenever transformers loads a model class):
then the variable must come from the environment or ``tests/conftest.py``, and the kernel
tests fail with a message saying so. The interpreter is slow: shapes stay at a few hundred
tokens. With a GPU the same tests run the compiled kernels on CUDA tensors.
"""

import os

import torch

GPU = torch.cuda.is_available()
if not GPU:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported (see the docstring)

import importlib.util  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

triton = pytest.importorskip("triton")

from aim import dispatch, merge, prune  # noqa: E402
from aim.merge import best_match_reference, merge_tokens  # noqa: E402
from aim.temporal import temporal_destinations, temporal_matches  # noqa: E402
from aim.prune import pagerank_importance_reference  # noqa: E402
from aim.kernels import importance, matching  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DEVICE = "cuda" if GPU else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
RUNNABLE = GPU or matching.interpreted(matching._best_match_kernel)
NOT_RUNNABLE = (
    "no GPU, and triton was imported before TRITON_INTERPRET=1 was set (torch._dynamo imports it "
    "when transformers loads a model class), so the kernels cannot run in this process: set "
    "TRITON_INTERPRET=1 in the environment or in tests/conftest.py, or run this file on its own"
)
best_match_triton = matching.best_match_triton
pagerank_importance_triton = importance.pagerank_importance_triton


@pytest.fixture(autouse=True)
def _runnable(request):
    if not RUNNABLE and request.function.__name__ not in _NO_KERNEL:
        pytest.fail(NOT_RUNNABLE, pytrace=False)


def _randn(*shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype=dtype, device=DEVICE)


# ---------------------------------------------------------------- best match


def _check_best_match(set_a, set_b):
    score, index = best_match_triton(set_a, set_b)
    ref_score, ref_index = best_match_reference(set_a, set_b)
    assert score.dtype == torch.float32 and index.dtype == torch.int64
    assert score.shape == ref_score.shape and index.shape == ref_index.shape
    torch.testing.assert_close(score, ref_score, rtol=1e-5, atol=1e-5)

    # indices: exact where the reference's best beats its runner-up clearly; elsewhere the
    # chosen token must be (within tolerance) as similar as the best one
    a = set_a.float() / set_a.float().norm(dim=-1, keepdim=True).clamp_min(1e-12)
    b = set_b.float() / set_b.float().norm(dim=-1, keepdim=True).clamp_min(1e-12)
    sim = a @ b.transpose(-1, -2)
    if sim.shape[-1] > 1:
        top2 = sim.topk(2, dim=-1).values
        clear = (top2[..., 0] - top2[..., 1]) > 1e-4
    else:
        clear = torch.ones_like(ref_index, dtype=torch.bool)
    assert clear.float().mean() > 0.9  # the data is random: near-ties are rare
    assert torch.equal(index[clear], ref_index[clear])
    torch.testing.assert_close(sim.gather(-1, index.unsqueeze(-1)).squeeze(-1), ref_score, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "groups, num_a, num_b, dim",
    [
        (1, 1, 1, 16),  # a single token each
        (1, 130, 67, 32),  # several tiles of A and B, neither a multiple of the block
        (6, 33, 31, 16),  # many groups, odd counts
        (2, 9, 70, 80),  # dim not a power of two, larger than one dim block
        (3, 98, 98, 24),  # a 196-token frame
    ],
)
def test_best_match_matches_reference(dtype, groups, num_a, num_b, dim):
    set_a = _randn(groups, num_a, dim, dtype=dtype, seed=1)
    set_b = _randn(groups, num_b, dim, dtype=dtype, seed=2)
    _check_best_match(set_a, set_b)


def test_best_match_strided_views_like_merge_step():
    x = _randn(4, 147, 40, seed=3)  # merge_step passes x[:, ::2] and x[:, 1::2]
    _check_best_match(x[:, ::2], x[:, 1::2])
    _check_best_match(x.transpose(1, 2).contiguous().transpose(1, 2)[:, ::2], x[:, 1::2])


def _small_ints(*shape, seed):
    # integer entries: every dot product and norm is exact, so equal similarities tie exactly
    # whatever order a BLAS or a GPU sums them in
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-3, 4, shape, generator=g).float().to(DEVICE)


def test_best_match_ties_go_to_lowest_index():
    # every B token identical (across several tiles): all similarities tie, index 0 wins
    set_a = _small_ints(2, 20, 16, seed=4)
    set_b = _small_ints(2, 1, 16, seed=5).expand(2, 150, 16).contiguous()
    score, index = best_match_triton(set_a, set_b)
    ref_score, ref_index = best_match_reference(set_a, set_b)
    assert index.eq(0).all() and torch.equal(index, ref_index)
    torch.testing.assert_close(score, ref_score)
    # a zero A token: similarity 0 with every B token, index 0 as with torch.max
    set_a = torch.zeros(1, 3, 16, device=DEVICE)
    score, index = best_match_triton(set_a, _randn(1, 90, 16, seed=6))
    assert score.eq(0).all() and index.eq(0).all()
    # the same best token twice, in different tiles (block 64): the earlier one wins
    set_b = _small_ints(1, 100, 16, seed=7)
    set_b[0, 90] = set_b[0, 5]
    set_a = torch.cat([set_b[:, 5:6] * 2.0, set_b[:, 90:91] * 3.0], dim=1)
    score, index = best_match_triton(set_a, set_b)
    assert index.tolist() == [[5, 5]] and torch.equal(index, best_match_reference(set_a, set_b)[1])
    torch.testing.assert_close(score, torch.ones_like(score))


@pytest.mark.parametrize("window", [1, 3])
def test_temporal_merging_with_triton_backend(monkeypatch, window):
    # temporal merging's hot loop is the frame-against-earlier-frames matching: the same kernel
    frames = _randn(6, 36, 24, seed=9)
    frames[1:] = frames[:1] + 0.3 * frames[1:]  # frames that repeat the first, as video does
    monkeypatch.setenv("AIM_BACKEND", "torch")
    ref_score, ref_target = temporal_matches(frames, window)
    ref = temporal_destinations(frames, keep=0.25, window=window)
    monkeypatch.setenv("AIM_BACKEND", "triton")
    score, target = temporal_matches(frames, window)
    assert torch.equal(target, ref_target)
    torch.testing.assert_close(score, ref_score)
    assert torch.equal(temporal_destinations(frames, keep=0.25, window=window), ref)


def test_merge_tokens_with_triton_backend(monkeypatch):
    x = _randn(3, 196, 32, seed=8)
    monkeypatch.setenv("AIM_BACKEND", "torch")
    ref = merge_tokens(x, (0.5, 0.25))
    monkeypatch.setenv("AIM_BACKEND", "triton")
    out = merge_tokens(x, (0.5, 0.25))
    assert torch.equal(out.index, ref.index)
    assert torch.equal(out.sizes, ref.sizes)
    torch.testing.assert_close(out.features, ref.features)


# ---------------------------------------------------------------- importance


def _left_padded(batch, n, pads):
    valid = torch.ones(batch, n, dtype=torch.bool)
    for row, pad in enumerate(pads):
        valid[row, :pad] = False
    return valid.to(DEVICE)


def _check_importance(query, key, valid, **kwargs):
    out = pagerank_importance_triton(query, key, valid, **kwargs)
    ref = pagerank_importance_reference(query, key, valid, **kwargs)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    # the scores are ~1/N; tau = 0.1 magnifies logit rounding ten-fold
    torch.testing.assert_close(out, ref, rtol=1e-3, atol=1e-3 / max(valid.shape[1], 1))
    assert torch.equal(out[~valid], torch.zeros_like(out[~valid]))
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "batch, heads, kv_heads, n, dim, pads",
    [
        (1, 1, 1, 1, 16, [0]),  # a single token
        (2, 2, 2, 130, 32, [0, 45]),  # GQA ratio 1, three row/column tiles, left padding
        (1, 7, 1, 70, 16, [3]),  # GQA ratio 7, odd count
    ],
)
def test_importance_matches_reference(dtype, batch, heads, kv_heads, n, dim, pads):
    query = _randn(batch, heads, n, dim, dtype=dtype, seed=10)
    key = _randn(batch, kv_heads, n, dim, dtype=dtype, seed=11)
    _check_importance(query, key, _left_padded(batch, n, pads))


@pytest.mark.parametrize("tau, iterations", [(0.1, 0), (0.5, 1), (0.05, 3), (1.0, 7)])
def test_importance_tau_and_iterations(tau, iterations):
    query = _randn(1, 2, 97, 32, seed=12)
    key = _randn(1, 1, 97, 32, seed=13)
    _check_importance(query, key, _left_padded(1, 97, [10]), tau=tau, iterations=iterations)


def test_importance_holes_empty_rows_and_strided_inputs():
    # tokens removed mid-sequence, a prompt with no valid token at all, and (batch, N, heads, d)
    # projections viewed as (batch, heads, N, d) the way attention layers hand them over
    batch, n, heads, kv_heads, dim = 3, 75, 4, 2, 16
    query = _randn(batch, n, heads, dim, seed=14).transpose(1, 2)
    key = _randn(batch, n, kv_heads, dim, seed=15).transpose(1, 2)
    valid = _left_padded(batch, n, [0, 20, 0])
    valid[0, 30:50:3] = False
    valid[2] = False
    out = _check_importance(query, key, valid)
    assert out[2].eq(0).all()
    assert not query.is_contiguous()


def test_importance_rejects_bad_gqa():
    with pytest.raises(ValueError, match="multiple"):
        pagerank_importance_triton(_randn(1, 3, 4, 16), _randn(1, 2, 4, 16), _left_padded(1, 4, [0]))


# ---------------------------------------------------------------- dispatch and packaging


def test_dispatch_triton_backend_routes_to_kernels(monkeypatch):
    calls = []

    def spy(fn):
        def wrapped(*args, **kwargs):
            calls.append(fn.__name__)
            return fn(*args, **kwargs)

        return wrapped

    monkeypatch.setattr(matching, "best_match_triton", spy(best_match_triton))
    monkeypatch.setattr(importance, "pagerank_importance_triton", spy(pagerank_importance_triton))
    monkeypatch.setenv("AIM_BACKEND", "triton")
    assert dispatch.backend_for(torch.zeros(1)) == "triton"

    set_a, set_b = _randn(2, 40, 16, seed=20), _randn(2, 39, 16, seed=21)
    score, index = merge.best_match(set_a, set_b)
    ref_score, ref_index = best_match_reference(set_a, set_b)
    torch.testing.assert_close(score, ref_score, rtol=1e-5, atol=1e-5)
    assert torch.equal(index, ref_index)

    query, key = _randn(1, 4, 50, 16, seed=22), _randn(1, 2, 50, 16, seed=23)
    valid = _left_padded(1, 50, [5])
    out = prune.pagerank_importance(query, key, valid, tau=0.2, iterations=4)
    ref = pagerank_importance_reference(query, key, valid, tau=0.2, iterations=4)
    torch.testing.assert_close(out, ref, rtol=1e-3, atol=1e-5)
    assert calls == ["best_match_triton", "pagerank_importance_triton"]

    monkeypatch.setenv("AIM_BACKEND", "torch")
    merge.best_match(set_a, set_b)
    assert len(calls) == 2  # the torch backend does not touch the kernels


def test_imports_stay_lazy():
    # ``import aim`` must not import the kernels; ``import aim.kernels`` must not import triton
    code = (
        "import sys, aim; assert not [m for m in sys.modules if m.startswith('aim.kernels')]; "
        "import aim.kernels as k; assert 'triton' not in sys.modules and 'aim.kernels.matching' not in sys.modules; "
        "assert callable(k.best_match_triton) and 'aim.kernels.matching' in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_another_top_level_kernels_package_changes_nothing(tmp_path):
    # sparsevlm and the hub ship a top-level ``kernels``: installed beside aim, it is theirs, and
    # aim's kernels (inside the aim package) are still found; aim installs no top-level ``kernels``
    from transformers.utils.import_utils import is_kernels_available

    fake = tmp_path / "kernels"
    fake.mkdir()
    (fake / "__init__.py").write_text("OWNER = 'someone else'\n")
    code = (
        "import kernels; assert kernels.OWNER == 'someone else'; "
        "from aim.kernels import pagerank_importance_triton, best_match_triton; "
        "assert callable(pagerank_importance_triton) and callable(best_match_triton)"
    )
    # the fake first, then this checkout (aim need not be installed: a GPU machine may run the
    # suite from a plain copy), then whatever the path held
    path = [str(tmp_path), str(ROOT), os.environ.get("PYTHONPATH", "")]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(path))
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path, env=env)
    assert not (ROOT / "kernels").exists()
    # transformers >= 5.25 depends on the hub's `kernels`: where one is importable, it is not aim's
    if is_kernels_available():
        spec = importlib.util.find_spec("kernels")
        assert spec is not None, "transformers says kernels is available, but it cannot be found"
        origin = Path(spec.origin).resolve()
        assert origin.parent != ROOT / "kernels" and ROOT / "aim" not in origin.parents, spec


_NO_KERNEL = {test_imports_stay_lazy.__name__, test_another_top_level_kernels_package_changes_nothing.__name__}
