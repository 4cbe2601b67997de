"""The exact blocked search against a plain in-memory brute force (no I/O), on the CPU and,
marked `gpu`, on CUDA (fp16 products there)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from graphbuild.graph.exact import blocked_topk, error_bound, exact_dots


def brute_force(x16: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """fp64 products of the fp16->fp32 vectors (exact for these inputs), rounded to fp32;
    best first, equal sims by smaller id."""
    x = x16.astype(np.float32).astype(np.float64)
    s = (x @ x.T).astype(np.float32)
    np.fill_diagonal(s, -np.inf)
    ids = np.broadcast_to(np.arange(len(x)), s.shape)
    order = np.lexsort((ids, -s), axis=1)[:, :k]
    return order, np.take_along_axis(s, order, 1)


def clustered(n: int, d: int, seed: int = 0) -> np.ndarray:
    """Unit vectors in tight clusters, with exact duplicates: many near-ties and ties."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((max(2, n // 60), d))
    x = centres[rng.integers(0, len(centres), n)] + 0.3 * rng.standard_normal((n, d))
    x[10] = x[20]
    x[30] = x[31] = x[32]
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)


@pytest.fixture(params=["compiled", "torch", pytest.param("cuda", marks=pytest.mark.gpu)])
def candidates(request, monkeypatch):
    """Every search test runs with the compiled candidate buffers (CPU), with the torch ones
    on the CPU, and on CUDA (torch's, fp16 products). Gives the device to search on."""
    from graphbuild.graph import exact

    monkeypatch.setattr(exact, "COMPILED_ON_CPU", request.param == "compiled")
    return "cuda" if request.param == "cuda" else "cpu"


def run(x16, k, rows=None, device="cpu", **kw):
    return blocked_topk(x16, k, rows, device=device, **kw)


@pytest.mark.parametrize("block_rows", [64, 250, 4096])
def test_equals_brute_force(block_rows, candidates):
    x16 = clustered(1500, 48)
    ref_i, ref_s = brute_force(x16, 10)
    ids, sims = run(x16, 10, block_rows=block_rows, device=candidates)
    assert np.array_equal(sims, ref_s)
    assert np.array_equal(ids, ref_i)


def test_row_ranges_use_plain_products_for_other_rows(candidates):
    x16 = clustered(1200, 32, seed=1)
    ref_i, ref_s = brute_force(x16, 7)
    for rows in (range(400), range(400, 1000), range(1000, 1200), range(5, 6)):
        ids, sims = run(x16, 7, rows, block_rows=128, device=candidates)
        assert np.array_equal(sims, ref_s[rows.start:rows.stop])
        assert np.array_equal(ids, ref_i[rows.start:rows.stop])


def test_rows_let_go_while_multiplying_and_reloaded_to_rerank():
    x16 = clustered(900, 32, seed=8)
    ref_i, ref_s = brute_force(x16, 9)
    loads = []

    def reload():
        loads.append(1)
        return x16.copy()

    ids, sims = run(x16.copy(), 9, block_rows=128, reload=reload)
    assert loads == [1]
    assert np.array_equal(sims, ref_s) and np.array_equal(ids, ref_i)
    ids, sims = run(x16.copy(), 9, range(100, 500), block_rows=128, reload=reload)
    assert loads == [1]  # a row range needs the other rows throughout: kept, not reloaded
    assert np.array_equal(sims, ref_s[100:500]) and np.array_equal(ids, ref_i[100:500])


def test_small_capacity_falls_back_and_stays_exact(candidates):
    x16 = clustered(600, 16, seed=2)
    ref_i, ref_s = brute_force(x16, 12)
    ids, sims = run(x16, 12, block_rows=100, capacity=12, device=candidates)
    assert np.array_equal(sims, ref_s)
    assert np.array_equal(ids, ref_i)


def test_dense_graph_k_is_n_minus_one(candidates):
    x16 = clustered(50, 8, seed=3)
    ref_i, ref_s = brute_force(x16, 49)
    ids, sims = run(x16, 49, block_rows=16, device=candidates)
    assert np.array_equal(sims, ref_s) and np.array_equal(ids, ref_i)


def test_ties_broken_by_smaller_id(candidates):
    x = np.zeros((6, 4), np.float16)
    x[:, 0] = 1  # all identical: every sim is 1, so neighbours are the other ids in order
    ids, sims = run(x, 3, block_rows=4, device=candidates)
    assert ids.tolist() == [[1, 2, 3], [0, 2, 3], [0, 1, 3], [0, 1, 2], [0, 1, 2], [0, 1, 2]]
    assert (sims == 1).all()


def test_error_bound_holds_for_bf16_products():
    x16 = clustered(800, 384, seed=4)
    bound = error_bound(x16, "bf16")
    assert bound.absolute < 2 * 2 ** -8 + 1e-4  # never looser than the worst case
    xb = torch.from_numpy(x16).float().bfloat16()
    approx = (xb @ xb.T).float().numpy().astype(np.float64)
    exact = x16.astype(np.float64) @ x16.astype(np.float64).T
    assert (np.abs(approx - exact) <= bound.absolute + bound.relative * np.abs(approx)).all()


def test_exact_dots_are_exact():
    x16 = clustered(100, 384, seed=5)
    rows, cols = np.arange(100), np.arange(100)[::-1].copy()
    want = np.einsum("pd,pd->p", x16[rows].astype(np.float64),
                     x16[cols].astype(np.float64)).astype(np.float32)
    assert np.array_equal(exact_dots(x16, rows, cols), want)


def test_compiled_rerank_dots_are_exact():
    """The re-rank's compiled dots (fp16 through a table, fp64 sums) against fp64, bit for
    bit, with zeros, -0 and fp16 subnormals among the values."""
    from graphbuild.graph.exact import _exact_dots_of_rows

    x16 = clustered(200, 384, seed=6)
    x16[:, :7] = np.float16(0)
    x16[:, 7] = np.float16(-0.0)
    x16[::2, 8:12] = np.float16(2.0 ** -20)  # subnormal
    x16[1::2, 8:12] = np.float16(-(2.0 ** -24))  # the smallest subnormal
    rows = np.arange(0, 200, 3)
    rng = np.random.default_rng(1)
    rr = np.repeat(np.arange(len(rows)), 30)
    cols = rng.integers(0, 200, len(rr))
    want = np.einsum("pd,pd->p", x16[rows[rr]].astype(np.float64),
                     x16[cols].astype(np.float64)).astype(np.float32)
    assert np.array_equal(_exact_dots_of_rows(x16, rows, rr, cols), want)


def test_rejects_bad_k():
    x16 = clustered(40, 8)
    with pytest.raises(ValueError):
        run(x16, 0)
    with pytest.raises(ValueError):
        run(x16, 40)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_int16_keys_never_drop_a_score(dtype):
    """Filtering compares half-precision bit patterns as int16: v >= thr must imply
    bits(v) >= key, for thresholds of any sign (and the +inf padding sentinel)."""
    from graphbuild.graph.exact import _int16_key

    g = torch.Generator().manual_seed(0)
    thr = torch.cat([torch.rand(4000, generator=g) * 2.2 - 1.1,
                     torch.tensor([0.0, -0.0, 1e-9, -1e30, torch.inf])])
    v = (torch.rand(4000, generator=g) * 2.2 - 1.1).to(dtype)
    v = torch.cat([v, thr.to(dtype), torch.tensor([0.0, -0.0, torch.inf]).to(dtype)])
    key = _int16_key(thr, dtype)
    passes = v.float()[None, :] >= thr[:, None]
    assert not (passes & ~(v.view(torch.int16)[None, :] >= key[:, None])).any()


def test_locality_order_groups_similar_rows():
    from graphbuild.graph.exact import locality_order

    x16 = clustered(2000, 32, seed=3)[np.random.default_rng(3).permutation(2000)]
    x = torch.from_numpy(x16).float().bfloat16()
    order = locality_order(x, block_rows=200)
    assert sorted(order.tolist()) == list(range(2000))

    def mean_block_sim(rows):
        xb = x[rows].float().view(10, 200, -1)
        return float((xb @ xb.transpose(1, 2)).mean())

    assert mean_block_sim(order) > 2 * mean_block_sim(torch.arange(2000))
    assert torch.equal(locality_order(x, block_rows=200), order)  # deterministic
    assert torch.equal(locality_order(x, block_rows=1500), torch.arange(2000))  # one block


def test_filter_keys_never_above_the_threshold():
    """The compiled buffers' filter key of each k-th best is a bf16 value at most the fp32
    keep threshold that the re-rank applies, and the next key is above it (less margin)."""
    from graphbuild.graph.exact import SCORE_FLOOR, filter_keys
    from graphbuild.graph.kernels import KEY_AS_F32

    bound = error_bound(clustered(300, 384, seed=7), "bf16")
    keys = filter_keys(bound).astype(np.int64)
    kth = torch.from_numpy(KEY_AS_F32)
    finite = torch.isfinite(kth)
    thr = bound.keep_threshold(kth[finite]).clamp(min=SCORE_FLOOR).double().numpy()
    got = KEY_AS_F32[keys + 32768][finite.numpy()].astype(np.float64)
    assert (got <= thr).all()
    above = KEY_AS_F32[np.minimum(keys + 1, 32767) + 32768][finite.numpy()]
    t = kth[finite].double().numpy()
    assert (above >= thr - 2e-6 * (1 + np.abs(t))).all()


def test_kth_of_row_and_selection_against_numpy():
    """A dense row's k-th best key by counting passes, and the buffers' quickselect, equal a
    sort: rows with negative scores, -0, ties, k-th best outside the search window."""
    from graphbuild.graph.kernels import EMPTY_KEY, _kth_of_row, _ordered, _select_best

    rng = np.random.default_rng(0)
    rows = [rng.uniform(-1, 1, 300), rng.uniform(-1, -0.1, 300), np.full(300, 0.5),
            np.r_[np.full(20, 0.9), np.full(280, 1e-3)], np.r_[np.full(40, -0.0), 0.3]]
    for x in rows:
        bits = torch.from_numpy(x.astype(np.float32)).bfloat16().view(torch.int16).numpy()
        keys = np.array([_ordered(b) for b in bits])
        for k in (1, 8, 32):
            want = np.sort(keys)[-k]
            got = _kth_of_row(bits, k)
            # the counting passes look among positive keys near the top only
            assert got == (want if want > 0 and keys.max() - want < 256 else EMPTY_KEY)
            held, ids = keys.astype(np.int16), np.arange(len(keys), dtype=np.int32)
            assert _select_best(held, ids, len(held), k) == want
            assert (held[:k] >= want).all() and (held[k:] <= want).all()
            assert np.array_equal(keys[ids], held)  # ids moved with their keys


def test_cuda_matmul_context_forces_half_accumulation_off_and_restores_it():
    """Whatever turned them on, the search's CUDA matmuls neither reduce nor accumulate in
    half precision, and the process gets its settings back afterwards."""
    import torch

    from graphbuild.graph.exact import HALF_REDUCTION_FLAGS, _exact_cuda_matmul

    matmul = torch.backends.cuda.matmul
    present = [f for f in HALF_REDUCTION_FLAGS if hasattr(matmul, f)]
    assert "allow_fp16_accumulation" in present  # torch >= 2.7 has it
    saved = {f: getattr(matmul, f) for f in present}
    try:
        for f in present:
            setattr(matmul, f, True)
        with _exact_cuda_matmul():
            assert not any(getattr(matmul, f) for f in present)
        assert all(getattr(matmul, f) for f in present)
    finally:
        for f, v in saved.items():
            setattr(matmul, f, v)


def test_cuda_bound_takes_the_accumulation_spacing_2_pow_23(monkeypatch):
    """cuBLAS promises only at least 32-bit accumulation: on CUDA the bound's accumulation
    term uses 2**-23, and blocked_topk asks for the bound of its device."""
    from graphbuild.graph import exact

    assert exact.ACCUMULATION_ROUNDOFF == {"cpu": 2.0 ** -24, "cuda": 2.0 ** -23}
    x16 = clustered(200, 384, seed=3)
    cpu, cuda = exact.error_bound(x16, "fp16"), exact.error_bound(x16, "fp16", device="cuda:1")
    def g(u):
        return 384 * u / (1 - 384 * u)

    assert cuda.absolute - cpu.absolute == pytest.approx(
        (g(2.0 ** -23) - g(2.0 ** -24)) * 1.00001 ** 2, rel=1e-3)
    asked = []

    def spy(x, half, block_rows=65536, device="cpu"):
        asked.append((half, device))
        raise StopIteration

    monkeypatch.setattr(exact, "error_bound", spy)
    with pytest.raises(StopIteration):
        exact.blocked_topk(x16, 5, device="cuda:0")
    assert asked == [("fp16", "cuda:0")]


def test_rows_held_once_on_the_device_give_the_same_result(monkeypatch):
    """The CUDA path that uploads every row once (hold_all_rows), run on a CPU: a shard's
    search against other shards' rows, with a capacity small enough to overflow, equals
    brute force, and converts (uploads) each row once besides the query rows, where the
    block-by-block path converts the other rows once per own block and all rows again in
    every overflow round."""
    from graphbuild.graph import exact

    x16 = clustered(1200, 16, seed=2)
    ref_i, ref_s = brute_force(x16, 12)
    rows = range(300, 700)
    converted = []
    real = exact._Search.half_rows

    def counting(self, which, step=65536):
        converted.append(which.stop - which.start if isinstance(which, slice) else len(which))
        return real(self, which, step)

    monkeypatch.setattr(exact._Search, "half_rows", counting)
    by_block = run(x16, 12, rows, block_rows=100, capacity=12)
    per_block = sum(converted)
    converted.clear()
    monkeypatch.setattr(exact, "RESIDENT_ON_CPU", True)
    ids, sims = run(x16, 12, rows, block_rows=100, capacity=12)
    assert np.array_equal(sims, ref_s[300:700]) and np.array_equal(ids, ref_i[300:700])
    assert np.array_equal(ids, by_block[0])
    # the query rows twice (locality order, then in that order), every row once
    assert sum(converted) == 2 * 400 + 1200 < per_block


def near_duplicates_of_coco(coco3k, sources: int = 40, copies: int = 50,
                            others: int = 500) -> np.ndarray:
    """Real caption rows with many near-copies: each of `sources` COCO embeddings, `copies`
    times with small noise (more in some clusters than others), and twice exactly (ties),
    then `others` plain COCO rows. A copy has about `copies` near-ties within the bf16
    error bound of its k-th best, more than the default buffer holds."""
    import zarr

    x = zarr.open_array(str(coco3k / "embeddings.zarr"), mode="r")[:].astype(np.float32)
    rng = np.random.default_rng(5)
    noise = np.repeat(rng.uniform(0.02, 0.12, sources), copies)[:, None]
    src = np.repeat(np.arange(sources), copies)
    near = x[src] + noise * rng.standard_normal((len(src), x.shape[1])) / np.sqrt(x.shape[1])
    rows = np.concatenate([near, x[:sources], x[:sources], x[sources:sources + others]])
    rows = rows[rng.permutation(len(rows))]  # copies of one source apart in id order
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float16)


def test_many_overflows_on_real_rows_stay_exact(coco3k, candidates, monkeypatch):
    """Near-duplicated COCO rows overflow the default buffers of many rows; the re-search of
    them (seeded from the first pass's k-th best) gives brute force's ids and sims, equal
    sims by smaller id, in one batch of every such row."""
    from graphbuild.graph import exact

    x16 = near_duplicates_of_coco(coco3k)
    ref_i, ref_s = brute_force(x16, 16)
    searched = []
    real = exact._Search.plain

    def counting(self, rows, kth, capacity):
        searched.append(len(rows))
        return real(self, rows, kth, capacity)

    monkeypatch.setattr(exact._Search, "plain", counting)
    ids, sims = run(x16, 16, block_rows=256, device=candidates)
    assert len(searched) == 1 and searched[0] > 500, searched
    assert (ref_s[:, :-1] == ref_s[:, 1:]).any()  # exact ties among the neighbours
    assert np.array_equal(sims, ref_s)
    assert np.array_equal(ids, ref_i)
