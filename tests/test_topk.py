"""``retrieval.topk``: the exact search's kernels against a float64 brute force.

The Triton kernel runs here in Triton's interpreter (``TRITON_INTERPRET=1``, numpy on the CPU):
the same kernel source the GPU compiles, so the block-max pruning and both passes are checked
without a GPU (its speed is ``vtr bench gallery --device cuda``'s business). On a machine with
CUDA the same tests run compiled, on the GPU (``pytest tests/test_topk.py``)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from retrieval.topk import exact_topk, quantize, resolve_kernel, split_topk

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def test_triton_kernel_under_the_interpreter():
    """Runs this file's ``interpreted`` tests in a process where Triton starts in interpreter mode
    (Triton reads ``TRITON_INTERPRET`` when it is imported, so it cannot be switched in this one)."""
    pytest.importorskip("triton")
    if INTERPRETED:
        pytest.skip("already the interpreted process")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "interpreted",
                           str(Path(__file__))], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert " passed" in done.stdout and "skipped" not in done.stdout.splitlines()[-1], done.stdout[-2000:]


CUDA = torch.cuda.is_available() and not INTERPRETED
interpreted = pytest.mark.skipif(not (INTERPRETED or CUDA),
                                 reason="runs in test_triton_kernel_under_the_interpreter's process (or on a GPU)")
DEVICE = "cuda" if CUDA else "cpu"


def reference(queries, codes, scale, k):
    """The scores each store defines, in float64, unchunked: (values, indices)."""
    if scale is None:
        q = queries.to(codes.dtype).double()
        scores = q @ codes.double().T
    else:
        q_codes, q_scale = quantize(queries.float(), "int8")
        scores = (q_codes.double() @ codes.double().T) * scale.double().T * q_scale.double()
    return scores.topk(k, dim=1)


def gallery(n=1000, dim=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.normalize(torch.randn(n, dim, generator=g), dim=1)
    q = torch.nn.functional.normalize(torch.randn(20, dim, generator=g), dim=1)
    x[64:74] = torch.nn.functional.normalize(q[0] + 0.05 * torch.randn(10, dim, generator=g), dim=1)  # q0's top 10: one block
    x[[5, 200, 400, 600, 999]] = torch.nn.functional.normalize(q[1] + 0.05 * torch.randn(5, dim, generator=g), dim=1)
    return x, q  # q1's top 5: five blocks, the last one partial (1000 = 15 * 64 + 40)


@pytest.mark.interpreted
@interpreted
@pytest.mark.parametrize("store", ["fp32", "fp16", "bf16", "int8"])
@pytest.mark.parametrize("batch", [1, 20])
def test_triton_block_max_search_equals_brute_force(store, batch):
    x, q = gallery()
    q = q[:batch]
    codes, scale = (x, None) if store == "fp32" else quantize(x, store)
    want = reference(q, codes, scale, 10)
    to = (lambda t: None if t is None else t.to(DEVICE))
    values, indices = (t.cpu() for t in exact_topk(to(q), to(codes), to(scale), 10, kernel="triton"))
    assert torch.equal(indices, want.indices)
    torch.testing.assert_close(values.double(), want.values, rtol=1e-5, atol=1e-6)
    if batch > 1:
        assert set(indices[0].tolist()) == set(range(64, 74)) and {5, 200, 400, 600, 999} <= set(indices[1].tolist())


@pytest.mark.interpreted
@interpreted
def test_triton_int8_batch_on_the_integer_dot_is_exact_too():
    from retrieval.topk import _blockmax_topk

    x, q = gallery()
    codes, scale = quantize(x, "int8")
    to = (lambda t: t.to(DEVICE))
    for k in (10, 1000):
        want = exact_topk(q, codes, scale, k, kernel="torch")
        values, indices = (t.cpu() for t in _blockmax_topk(to(q), to(codes), to(scale), k, {"int8_dot": True}))
        assert torch.equal(indices, want[1]) and torch.equal(values, want[0])  # integer products: bit for bit


@pytest.mark.interpreted
@interpreted
def test_both_kernels_agree_on_fp32_and_int8_and_k_up_to_the_gallery():
    g = torch.Generator().manual_seed(4)
    x, q = torch.randn(300, 32, generator=g), torch.randn(70, 32, generator=g)  # 70 queries: two query blocks
    for store in ("fp32", "int8"):
        codes, scale = (x, None) if store == "fp32" else quantize(x, store)
        for k in (1, 64, 300):  # one row; one block's worth; every row (every block picked)
            a = exact_topk(q, codes, scale, k, kernel="torch", chunk=100)
            to = (lambda t: None if t is None else t.to(DEVICE))
            b = [t.cpu() for t in exact_topk(to(q), to(codes), to(scale), k, kernel="triton")]
            assert torch.equal(a[1], b[1]), (store, k)
            torch.testing.assert_close(a[0], b[0], rtol=1e-5, atol=1e-5)  # scores up to ~30: summation order


@pytest.mark.parametrize("store", ["fp32", "fp16", "bf16", "int8"])
def test_inductor_kernel_equals_brute_force_and_int8_bit_for_bit_the_torch_kernel(store):
    x, q = gallery(n=1003)
    q = q[:5]
    codes, scale = (x, None) if store == "fp32" else quantize(x, store)
    for batch in (1, 5):
        for k in (1, 10, 1003):  # one row; a usual k; every row
            want = reference(q[:batch], codes, scale, k)
            values, indices = exact_topk(q[:batch], codes, scale, k, kernel="inductor", chunk=300)  # 3 x 300 + 103
            assert values.dtype == torch.float32 and values.shape == (batch, k)
            assert torch.equal(indices, want.indices), (store, batch, k)
            torch.testing.assert_close(values.double(), want.values, rtol=1e-6, atol=1e-6)
            if store == "int8":  # exact integer products, then the same two scalings
                assert torch.equal(values, exact_topk(q[:batch], codes, scale, k, kernel="torch", chunk=300)[0])
    assert set(exact_topk(q[:1], codes, scale, 10, kernel="inductor")[1][0].tolist()) == set(range(64, 74))


def test_inductor_kernel_without_a_working_compiler_says_what_to_use(monkeypatch):
    from torch._inductor.exc import InductorError

    from retrieval import topk

    def no_compiler(codes, queries):
        raise InductorError(RuntimeError("g++: not found"), None)

    monkeypatch.setattr(topk, "_compiled_products", lambda: no_compiler)
    x = torch.randn(10, 8)
    with pytest.raises(RuntimeError, match="needs a working C\\+\\+ compiler.*use kernel='torch'"):
        exact_topk(x[:1], x, None, 3, kernel="inductor")


def test_split_topk_equals_one_topk_whatever_the_split():
    g = torch.Generator().manual_seed(7)
    for b, m in ((1, 1000), (3, 1001), (2, 37)):
        scores = torch.randn(b, m, generator=g)  # distinct values: one right answer
        for k in (1, 5, 31, m):
            for parts in (2, 7, 32):  # a leftover tail whenever parts does not divide m; fewer parts than asked at large k
                values, indices = split_topk(scores, k, parts)
                want = scores.topk(k, dim=1)
                assert torch.equal(values, want.values) and torch.equal(indices, want.indices), (b, m, k, parts)
    columns = torch.randn(50, 4, generator=g)  # a non-contiguous [B, M] view (the [rows, B] scores' transpose)
    assert torch.equal(split_topk(columns.T, 3, 4)[1], columns.T.topk(3, dim=1).indices)


def test_torch_kernel_multiplies_an_fp16_batch_in_fp32_and_rounds_the_scores_to_fp16():
    x, q = gallery(n=3000)
    codes, _ = quantize(x, "fp16")
    exact = q.half().double() @ codes.double().T  # [20, N]
    values, indices = exact_topk(q, codes, None, 10, kernel="torch", chunk=1024)  # fp32 GEMM on upcast chunks
    assert torch.equal(values.half().float(), values)  # fp16 values (returned as fp32, as every kernel does)
    torch.testing.assert_close(exact.gather(1, indices).half().float(), values, rtol=0, atol=0)  # each index has its score
    torch.testing.assert_close(values, exact.topk(10, dim=1).values.half().float(), rtol=0, atol=0)  # and the best


def test_kernel_choice_is_checked():
    assert resolve_kernel("auto", torch.device("cpu")) == "torch"
    with pytest.raises(ValueError, match="kernel must be one of"):
        resolve_kernel("cublas", torch.device("cpu"))
    x = torch.randn(10, 8)
    with pytest.raises(ValueError, match="int8 store needs its scales"):
        exact_topk(x[:2], quantize(x, "int8")[0], None, 3)
    with pytest.raises(ValueError, match=r"same width, got \(2, 4\) and \(10, 8\)"):
        exact_topk(x[:2, :4], x, None, 3, kernel="inductor")


def test_one_query_batched_products_equal_the_plain_product_and_where_they_are_used():
    from retrieval.retriever import batched_gemv, frame_products

    g = torch.Generator().manual_seed(5)
    for d in (128, 512):
        gallery, query = torch.randn(3000, d, generator=g), torch.randn(1, d, generator=g)
        products = frame_products(gallery[:, None, :], query).view(-1)  # the [N, 1, D] batched form
        torch.testing.assert_close(products, (gallery @ query.T)[:, 0], rtol=1e-5, atol=1e-4)
        assert torch.equal(exact_topk(query, gallery, None, 10)[1], (query @ gallery.T).topk(10).indices)
    assert batched_gemv(torch.zeros(5, 128), 1) and not batched_gemv(torch.zeros(5, 64), 1)  # MKL's gemv wins below
    assert not batched_gemv(torch.zeros(5, 128), 2) and not batched_gemv(torch.zeros(5, 128, dtype=torch.float16), 1)


def test_a_fusion_free_retrievers_one_query_gallery_scores_are_its_score():
    from retrieval.features import TextFeatures, VideoFeatures
    from retrieval.recipes import build_retriever

    model = build_retriever({"class_path": "baselines.clip4clip.MeanPool",
                             "init_args": {"backbone": "vtr-micro", "pretrained": None}})
    g = torch.Generator().manual_seed(6)
    video = VideoFeatures(embedding=torch.nn.functional.normalize(torch.randn(500, 256, generator=g), dim=1))
    text = TextFeatures(embedding=torch.nn.functional.normalize(torch.randn(1, 256, generator=g), dim=1))
    got = model.score_gallery(text, video)  # one query, 256 wide: the batched products
    assert got.shape == (1, 500)
    torch.testing.assert_close(got, model.score(text, video), rtol=1e-5, atol=1e-4)
