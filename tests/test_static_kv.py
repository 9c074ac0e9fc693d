"""The static-KV variant (fixed buffers shared by past and present; CUDA graphs on CUDA), on CPU.

Here it runs without CUDA graphs (CPU has none); benchmarks/gpu_bench.py runs it with them on an
H100. Checked against the fused variant of the same package and against transformers.
"""

from __future__ import annotations

import dataclasses
import os
import random
import threading
import time

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import portable_infer  # noqa: E402
from _serving import EngineSpy  # noqa: E402
from portable_infer.errors import CapacityError, InvalidArgumentError, PackageError  # noqa: E402

SEED = int(os.environ.get("STATIC_SEED") or random.SystemRandom().randrange(2**31))
TAG = f"[STATIC_SEED={SEED}]"


@pytest.fixture(scope="module")
def package(tiny_llama, tmp_path_factory):
    from exporters.export import export

    return export(tiny_llama.source, tmp_path_factory.mktemp("static") / "pkg", precision="fp32", verify=False,
                  variants=("portable", "fused", "static"))


@pytest.fixture(scope="module")
def static(package):
    return portable_infer.load(package, "cpu", static_kv=True, intra_op_threads=2)


@pytest.fixture(scope="module")
def fused(package):
    return portable_infer.load(package, "cpu", intra_op_threads=2, static_kv=False)


def prompts(rng, lengths):
    return [rng.integers(3, 256, n).tolist() for n in lengths]


def test_package_layout_and_selection(package, static, fused):
    files = sorted(p.name for p in package.iterdir())
    assert "model.static.onnx" in files and "model.static.onnx.data" not in files, files  # weights shared
    assert (static.variant, type(static.engine).__name__) == ("static", "StaticEngine")
    assert fused.variant == "fused"  # static_kv=False
    assert portable_infer.load(package, "cpu").variant == "static"  # the default where the package has it
    v = static.manifest.variant("static")
    assert v.kv.growth == "static" and "position_ids" not in [t.name for t in v.inputs]


def test_batch_of_different_lengths_equals_fused_one_by_one(static, fused, tiny_llama):
    rng = np.random.default_rng(SEED)
    ps = prompts(rng, rng.integers(2, 12, 4))
    batched = static.batch_generate_ids(ps, max_new_tokens=16)
    alone = [fused.generate_ids(p, max_new_tokens=16) for p in ps]
    assert batched == alone, f"{TAG} static batch differs from fused one by one"
    # transformers stops at the end token as we do (min_new_tokens would hold it back: another token)
    ref = tiny_llama.model.generate(torch.tensor([ps[0]]), max_new_tokens=16, do_sample=False)
    assert batched[0] == ref[0, len(ps[0]):].tolist(), f"{TAG} static differs from transformers"


def test_step_logits_match_the_fused_graph(static, fused):
    rng = np.random.default_rng(SEED + 1)
    ids = prompts(rng, [9])[0]
    diff = float(np.abs(static.forward_logits(ids) - fused.forward_logits(ids)).max())
    assert diff <= 1e-4, f"{TAG} static logits differ from fused by {diff:.2e}"


def test_caches_reuse_buffers_and_keep_apart_when_alive_together(static, monkeypatch):
    from portable_infer.engine.static_buffers import GRAPHS_PER_SHAPE

    e = static.engine
    plain = [e.new_cache(3, capacity=10) for _ in range(2)]  # no CUDA graphs: nothing pooled
    assert plain[0].capacity == 32  # rounded to PLAIN_CAPACITY_STEP only (CUDA graphs: 256)
    assert [c.graph_id for c in plain] == [-1, -1] and plain[0].values[0][0].data_ptr() != plain[1].values[0][0].data_ptr()
    ptr = plain[0].values[0][0].data_ptr()
    del plain[0]  # its buffers wait for the next cache of the shape
    assert e.new_cache(3, capacity=10).values[0][0].data_ptr() == ptr
    monkeypatch.setattr(e, "cuda_graph", True)  # what CUDA does: buffers pooled per shape for graphs
    alive = [e.new_cache(3, capacity=10) for _ in range(GRAPHS_PER_SHAPE + 1)]
    assert all(c.capacity == 256 for c in alive)
    ids = [c.graph_id for c in alive]
    assert len(set(ids[:-1])) == GRAPHS_PER_SHAPE and min(ids[:-1]) > 0 and ids[-1] == -1, ids
    assert len({c.values[0][0].data_ptr() for c in alive}) == len(alive)  # nothing shared while alive
    ptr, gid = alive[1].values[0][0].data_ptr(), alive[1].graph_id
    del alive[1]
    again = e.new_cache(3, capacity=10)  # the freed buffers, and the graph captured on them
    assert (again.values[0][0].data_ptr(), again.graph_id) == (ptr, gid)


def test_engines_over_one_session_never_share_a_cuda_graph_id(static, monkeypatch):
    """ONNX Runtime keeps captured CUDA graphs per session by id: the tuner's timing engines and
    then the model's run over one session, and an id one captured would replay its graph (on its
    buffers) for the other. Found on the H200: the tuner timed a 256-row step at batch 1's 5 ms."""
    from portable_infer.engine.session import make_engine

    engines = [make_engine(static.selection, static.manifest, static.engine.ort) for _ in range(3)]
    for e in engines:
        monkeypatch.setattr(e, "cuda_graph", True)  # what CUDA does
    assert {e.session for e in engines} == {static.engine.session}
    caches = [e.new_cache(b, capacity=10) for e in engines for b in (1, 4)]
    buffer = engines[0].buffer(4, 64)
    caches.append(engines[0].view(buffer, 0, 2, decode=True))
    ids = [c.graph_id for c in caches]
    assert min(ids) > 0 and len(set(ids)) == len(ids), ids


def test_capacity_and_call_shape_errors(static):
    e = static.engine
    cache = e.new_cache(1, capacity=4)
    ids = np.asarray([list(range(3, 3 + cache.capacity + 1))], np.int64)
    with pytest.raises(CapacityError, match="holds 32 tokens"):
        e.forward(ids, np.ones_like(ids), cache)
    cache = e.new_cache(2, capacity=8)
    two = np.asarray([[5, 6], [7, 8]], np.int64)
    e.forward(two, np.ones_like(two), cache)
    with pytest.raises(InvalidArgumentError, match="one row at a time"):
        e.forward(two, np.ones((2, 4), np.int64), cache)


def test_static_kv_needs_the_variant(tiny_llama, tmp_path):
    from exporters.export import export

    older = export(tiny_llama.source, tmp_path / "pkg", precision="fp32", verify=False, variants=("portable", "fused"))
    assert portable_infer.load(older, "cpu").variant == "fused"  # auto: what the package has
    with pytest.raises(PackageError, match="--variants portable,fused,static"):
        portable_infer.load(older, "cpu", static_kv=True)


def _released(event) -> bool:
    """Wait (bounded) until ``event`` is cleared."""
    deadline = time.monotonic() + 30
    while event.is_set():
        assert time.monotonic() < deadline, "never released"
        time.sleep(0.001)
    return True


def use_row_mover(engine, monkeypatch) -> None:
    """Move KV rows with the RowMover graph, as on GPUs (the CPU engine uses numpy)."""
    from portable_infer.engine.rows import RowMover

    mover = RowMover(engine.session, engine.ort, engine.variant.kv.dtype)
    monkeypatch.setattr(engine, "row_mover", lambda: mover)


@pytest.mark.parametrize("on_device", [False, True])
def test_move_rows_copies_per_run_of_targets_and_refuses_runs_that_overlap(static, monkeypatch, on_device):
    """kv_static.move_rows within one buffer and from another cache: one copy per run of
    consecutive target rows (through the RowMover graph, as on GPUs, or numpy); a single run may
    read its own targets (a compaction's repack), several runs may not; other rows untouched."""
    from portable_infer.engine import kv_static

    engine = static.engine
    if on_device:
        use_row_mover(engine, monkeypatch)
    copies, real_copy = [], kv_static.copy_rows
    monkeypatch.setattr(kv_static, "copy_rows", lambda dst, parts: copies.append(
        (dst.start, dst.batch)) or real_copy(dst, parts))
    rng = np.random.default_rng(SEED + 11)
    print(TAG)
    buf = engine.buffer(8, 64)
    buf.rows = np.full(8, 64, np.int64)  # every position held (numpy copies the tokens rows hold)
    for pair in buf.values:
        for v in pair:
            kv_static.write(v, np.dtype(buf.layout.dtype), lambda out: out.__setitem__(
                Ellipsis, rng.standard_normal(out.shape).astype(out.dtype)))
    before = [[v.numpy().copy() for v in pair] for pair in buf.values]

    def check(rows, at):
        for pair, old in zip(buf.values, before):
            for v, o in zip(pair, old):
                want = o.copy()
                want[at] = o[rows]
                np.testing.assert_array_equal(v.numpy(), want, err_msg=TAG)
                o[...] = want

    kv_static.move_rows(buf, buf, [3, 4, 6, 7], [2, 3, 4, 5])  # one run onto its own rows: a repack
    check([3, 4, 6, 7], [2, 3, 4, 5])
    assert copies == [(2, 4)], copies
    copies.clear()
    kv_static.move_rows(buf, buf, [6, 0], [7, 1])  # two runs, nothing read is written
    check([6, 0], [7, 1])
    assert sorted(copies) == [(1, 1), (7, 1)], copies
    with pytest.raises(ValueError, match="onto each other"):
        kv_static.move_rows(buf, buf, [5, 0], [0, 3])  # run [0] writes what run [3] reads
    with pytest.raises(ValueError, match="one distinct target"):
        kv_static.move_rows(buf, buf, [1, 2], [4, 4])
    check([], [])  # refused moves wrote nothing


@pytest.mark.parametrize("on_device", [False, True])
@pytest.mark.parametrize("slots", [False, True])
def test_scheduler_on_fixed_buffers_equals_single_runs(static, fused, monkeypatch, on_device, slots):
    """Continuous batching with the static graph: rows join (prefill groups, chunked prefill, a
    cached prefix) and leave a batch whose KV lives in fixed buffers; every request still gives
    its single run's greedy tokens. ``on_device``: KV rows move and reach the prefix cache
    through the RowMover graph (as on GPUs) instead of numpy. ``slots``: the batch is fixed
    slots of one buffer (SlotBatch, the default on GPUs), rows prefilled into free slots."""
    from portable_infer.engine.kv_growing import GrowingCache
    from portable_infer.engine.kv_static import StaticCache
    from portable_infer.serving.scheduler import Scheduler, SchedulerConfig

    if on_device:
        use_row_mover(static.engine, monkeypatch)
    made, real_new = [], static.engine.new_cache
    monkeypatch.setattr(static.engine, "new_cache", lambda *a, **k: made.append(real_new(*a, **k)) or made[-1])

    rng = np.random.default_rng(SEED + 3)
    shared = prompts(rng, [20])[0]
    ps = prompts(rng, [5, 17, 40, 3]) + [shared + prompts(rng, [4])[0], shared + prompts(rng, [7])[0]]
    news = [30, 12, 20, 25, 9, 14]
    ref = [fused.generate_ids(p, max_new_tokens=n, ignore_eos=True) for p, n in zip(ps, news)]
    config = SchedulerConfig(max_batch=4, prefill_chunk=8, block_size=16, slot_batch=slots)
    with Scheduler(static, config) as sched:
        assert type(sched.batch).__name__ == ("SlotBatch" if slots else "RunningBatch")
        first = sched.submit(ps[0], max_new_tokens=news[0], ignore_eos=True)
        head = [first.get(30).token for _ in range(3)]  # running before the others come
        handles = [sched.submit(p, max_new_tokens=n, ignore_eos=True) for p, n in zip(ps[1:5], news[1:5])]
        outs = [head + [r.token for r in first if r.token is not None]]
        outs += [[r.token for r in h if r.token is not None] for h in handles]
        last = sched.submit(ps[5], max_new_tokens=news[5], ignore_eos=True)  # after ps[4]: its prefix is cached
        outs.append([r.token for r in last if r.token is not None])
        stats = sched.stats()
    kinds = {type(c) for c in made}
    assert kinds == {StaticCache} and GrowingCache not in kinds, kinds
    for i, (got, want) in enumerate(zip(outs, ref)):
        assert got == want, f"{TAG} request {i} differs from its single run on the fused graph"
    assert stats.prefix_cache_hits >= 1 and stats.prefix_cache_tokens >= 16
    assert stats.blocks_used == 0 and stats.requests_finished == len(ps)


def test_static_export_refuses_sliding_windows(tmp_path):
    transformers = pytest.importorskip("transformers")
    from exporters.export import export

    cfg = transformers.MistralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                     num_attention_heads=2, num_key_value_heads=1, sliding_window=4)
    transformers.MistralForCausalLM(cfg).save_pretrained(tmp_path / "hf")
    with pytest.raises(InvalidArgumentError, match="sliding windows"):
        export(tmp_path / "hf", tmp_path / "pkg", precision="fp32", verify=False,
               variants=("fused", "static"))
    assert not (tmp_path / "pkg").exists()


def test_greedy_on_the_device_returns_the_logits_argmax(static, fused, monkeypatch):
    e = static.engine
    assert e.greedy_on_device  # the static graph has a next_token output
    rng = np.random.default_rng(SEED + 2)
    ps = prompts(rng, [6, 3, 9])
    width = 9
    ids = np.zeros((3, width), np.int64)
    mask = np.zeros((3, width), np.int64)
    for i, p in enumerate(ps):
        ids[i, width - len(p):], mask[i, width - len(p):] = p, 1
    by_id, by_logits = e.new_cache(3, capacity=32), e.new_cache(3, capacity=32)
    for _ in range(6):  # prefill, then decode steps fed with the device's choice
        tok = e.forward(ids, mask, by_id, greedy=True)
        logits = e.forward(ids, mask, by_logits)
        assert tok.dtype == np.int64 and tok.shape == (3,)
        assert tok.tolist() == logits.argmax(-1).tolist(), f"{TAG} next_token differs from the logits' argmax"
        ids, mask = tok[:, None], np.concatenate([mask, np.ones((3, 1), np.int64)], axis=1)

    calls = []
    forward = e.forward
    monkeypatch.setattr(e, "forward", lambda *a, **k: calls.append(k.get("greedy", False)) or forward(*a, **k))
    greedy = static.batch_generate_ids(ps, max_new_tokens=8)
    assert calls and all(calls), "plain greedy rows did not decode on the device"
    assert greedy == [fused.generate_ids(p, max_new_tokens=8) for p in ps], f"{TAG} device greedy differs from fused"
    calls.clear()  # a row that needs the logits (sampling, logprobs) takes them for the whole batch
    static.batch_generate_ids(ps[:2], max_new_tokens=4, temperature=0.7, seed=1)
    assert calls and not any(calls)


def test_rows_keep_their_tokens_when_caches_of_different_capacities_merge_and_split(static):
    from portable_infer.engine.kv_static import write

    e = static.engine
    rng = np.random.default_rng(SEED + 4)
    a, b = e.new_cache(1, capacity=50), e.new_cache(2, capacity=10)  # capacities 64 and 32
    a.rows, b.rows = np.array([45]), np.array([7, 30])
    a.length, b.length = 45, 30
    dtype = np.dtype(a.layout.dtype)
    data = {}
    for c in (a, b):
        for layer, pair in enumerate(c.values):
            for j, v in enumerate(pair):
                x = rng.standard_normal(v.shape()).astype(dtype)
                write(v, dtype, lambda out, x=x: out.__setitem__(Ellipsis, x))
                data[id(c), layer, j] = x
    mask_a, mask_b = np.ones((1, 45), np.int64), np.zeros((2, 30), np.int64)
    mask_b[0, -7:], mask_b[1, :] = 1, 1
    merged, mask = a.merge(mask_a, b, mask_b)
    assert (merged.batch, merged.capacity, merged.rows.tolist(), mask.shape) == (3, 64, [45, 7, 30], (3, 45))
    keep_rows = [(a, 0, 45), (b, 0, 7), (b, 1, 30)]
    for layer, pair in enumerate(merged.values):
        for j, v in enumerate(pair):
            got = v.numpy()
            for i, (c, row, n) in enumerate(keep_rows):
                np.testing.assert_array_equal(got[i, :, :n], data[id(c), layer, j][row, :, :n])
    left, mask2 = merged.take(mask, [2, 0])
    assert left.rows.tolist() == [30, 45] and mask2.shape == (2, 45)
    np.testing.assert_array_equal(left.values[0][1].numpy()[0, :, :30], data[id(b), 0, 1][1, :, :30])
    np.testing.assert_array_equal(left.values[0][1].numpy()[1, :, :45], data[id(a), 0, 1][0, :, :45])


def test_scheduler_decodes_greedy_batches_on_the_device(static, fused, monkeypatch):
    from portable_infer.serving.scheduler import Scheduler, SchedulerConfig

    rng = np.random.default_rng(SEED + 5)
    ps = prompts(rng, [6, 9, 4])
    ref = [fused.generate_ids(p, max_new_tokens=10, ignore_eos=True) for p in ps]
    e, calls = static.engine, []
    forward = e.forward
    monkeypatch.setattr(e, "forward", lambda ids, *a, **k: calls.append((ids.shape[1], k.get("greedy", False)))
                        or forward(ids, *a, **k))
    with Scheduler(static, SchedulerConfig(max_batch=4)) as sched:
        outs = [[r.token for r in h if r.token is not None]
                for h in [sched.submit(p, max_new_tokens=10, ignore_eos=True) for p in ps]]
    decode = [g for s, g in calls if s == 1]
    assert outs == ref and decode and all(decode), f"{TAG} {calls}"
    calls.clear()  # a sampled row in the batch: the logits come back for every row
    with Scheduler(static, SchedulerConfig(max_batch=4)) as sched:
        hs = [sched.submit(ps[0], max_new_tokens=6, ignore_eos=True),
              sched.submit(ps[1], max_new_tokens=6, ignore_eos=True, temperature=0.8, seed=3)]
        [[r.token for r in h] for h in hs]
    assert not any(g for s, g in calls if s == 1)


@pytest.mark.parametrize("on_device", [False, True])
def test_finished_rows_wait_in_the_batch_where_leaving_is_deferred(static, fused, monkeypatch, on_device):
    """Off the CPU, rows that finish stay in a fixed-buffer batch, masked so they hold still, until
    half the batch has finished or a request joins (no KV round trip and no new CUDA graph per
    leave). Forced on here: a long prompt finishes first and waits ~30 steps (it would outgrow
    the buffers if it kept moving), then a late request joins, and every request still gives its
    single run's tokens with far fewer compactions than rows finishing. ``on_device``: rows move
    through the RowMover graph (as on GPUs) instead of numpy."""
    from portable_infer.engine.kv_static import StaticCache
    from portable_infer.engine.rows import RowMover
    from portable_infer.serving.scheduler import Scheduler, SchedulerConfig

    assert static.engine.row_mover() is None  # the CPU moves rows with numpy
    moved = []
    if on_device:
        monkeypatch.setattr(RowMover, "copy", lambda *a, real=RowMover.copy, **k: (moved.append(1), real(*a, **k))[1])
        use_row_mover(static.engine, monkeypatch)

    rng = np.random.default_rng(SEED + 7)
    # request 1 finishes first; the first submitted may be prefilled alone, the rest join it at once
    ps = prompts(rng, [6, 40, 9, 4, 12, 7, 5, 8])
    news = [40, 2, 42, 44, 45, 41, 43, 9]  # buffers of 64 tokens: 40 + 2 + 23 idle steps would not fit
    ref = [fused.generate_ids(p, max_new_tokens=n, ignore_eos=True) for p, n in zip(ps, news)]
    takes, real_take = [], StaticCache.take
    monkeypatch.setattr(StaticCache, "take",
                        lambda c, mask, keep: (takes.append(len(keep)), real_take(c, mask, keep))[1])
    start, hold, held, batches = threading.Event(), threading.Event(), threading.Event(), []

    def paced(ids, mask, cache, *_):  # forwards wait for every submit; decode step 30 while ``hold``
        start.wait(30)
        if ids.shape[1] == 1:
            batches.append((ids.shape[0], cache.capacity))
            if len(batches) == 30 and hold.is_set():
                held.set()
                _released(hold)

    with Scheduler(static, SchedulerConfig(max_batch=8, prefill_chunk=64)) as sched:
        sched.planner = sched.queues.planner = dataclasses.replace(sched.planner, defer_leave=True)
        sched.engine = EngineSpy(sched.engine, paced)
        hold.set()
        handles = [sched.submit(p, max_new_tokens=n, ignore_eos=True) for p, n in zip(ps[:7], news[:7])]
        start.set()
        assert held.wait(30), "decode step 30 never came"
        handles.append(sched.submit(ps[7], max_new_tokens=news[7], ignore_eos=True))  # joins: compacts
        while sched.stats().prefilling == 0 and not handles[7].done:
            time.sleep(0.001)
        hold.clear()
        outs = [[r.token for r in h if r.token is not None] for h in handles]
        stats = sched.stats()
    for i, (got, want) in enumerate(zip(outs, ref)):
        assert got == want, f"{TAG} request {i} differs from its single run on the fused graph"
    assert stats.blocks_used == 0 and stats.requests_finished == len(ps) and stats.running == 0
    # the row that finished at its first step stayed (masked) through step 30: no compaction.
    # The planner admits what has been submitted when it plans: on a loaded machine the seven
    # submits can land in two plans, and the second join compacts the finished row out (a join
    # compacts by design); then the batch must hold still from that join on.
    sizes = [b for b, _ in batches[:30]]
    last_join = max(i for i in range(len(sizes)) if i == 0 or sizes[i] > sizes[i - 1])
    if (7, 64) in batches[:2]:
        seven = batches.index((7, 64))
        assert batches[seven:30] == [(7, 64)] * (30 - seven), f"{TAG} {batches[:30]}"
    else:
        assert last_join <= 2 and len(set(batches[last_join:30])) == 1, f"{TAG} {batches[:30]}"
    assert 1 <= len(takes) < len(ps) - 2, f"{TAG} compactions: {takes}"
    assert not on_device or moved
