"""The running batch as fixed slots of one KV buffer (serving/slot_batch.py), on the CPU.

On GPUs it is the scheduler's default for static-KV graphs; here it is forced on
(``SchedulerConfig(slot_batch=True)``) and checked against single runs of the fused graph:
rows prefilled straight into free slots, slots freed and reused, the highest rows moved down
when the batch shrinks, and every row moved once into a larger buffer when a request needs
more capacity. Rows move with numpy and with the RowMover graph (as on GPUs).
"""

from __future__ import annotations

import os
import random

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from portable_infer.engine import cuda_graphs  # noqa: E402
from portable_infer.serving import slot_batch  # noqa: E402
from portable_infer.serving.scheduler import Scheduler, SchedulerConfig  # noqa: E402

SEED = int(os.environ.get("SLOT_SEED") or random.SystemRandom().randrange(2**31))
TAG = f"[SLOT_SEED={SEED}]"

from test_static_kv import fused, package, static  # noqa: E402,F401 - the same tiny model, static and fused


def test_buckets():
    assert [slot_batch.bucket(n, 256) for n in (1, 2, 3, 5, 9, 17, 33, 49, 65, 200, 256)] == \
        [1, 2, 4, 8, 16, 32, 48, 64, 96, 224, 256]
    assert slot_batch.bucket(300, 512) == 320 and slot_batch.bucket(20, 12) == 12


@pytest.mark.parametrize("on_device", [False, True])
def test_slots_join_leave_move_down_and_grow_with_single_run_tokens(static, fused, monkeypatch, on_device):
    if on_device:
        from portable_infer.engine.rows import RowMover

        mover = RowMover(static.engine.session, static.engine.ort, static.engine.variant.kv.dtype)
        monkeypatch.setattr(static.engine, "row_mover", lambda: mover)
    copies, moves, joining, real_copy, real_move = [], [], [], slot_batch.copy_rows, slot_batch.move_rows
    monkeypatch.setattr(slot_batch, "copy_rows", lambda dst, parts: copies.append((dst.start, dst.batch, bool(joining)))
                        or real_copy(dst, parts))
    monkeypatch.setattr(slot_batch, "move_rows", lambda dst, src, rows, at: moves.append(
        (src is dst, list(rows), list(at), bool(joining))) or real_move(dst, src, rows, at))
    real_join, real_prefill_cache = slot_batch.SlotBatch.join, slot_batch.SlotBatch._prefill_cache
    prefilled = []
    monkeypatch.setattr(slot_batch.SlotBatch, "_prefill_cache",
                        lambda self, *a: prefilled.append(real_prefill_cache(self, *a)) or prefilled[-1])

    def join(self, done):
        joining.append(1)
        try:
            return real_join(self, done)
        finally:
            joining.pop()
    monkeypatch.setattr(slot_batch.SlotBatch, "join", join)
    views, real_view = [], static.engine.view
    monkeypatch.setattr(static.engine, "view", lambda c, s, n, **k: views.append((s, n, k.get("decode", False)))
                        or real_view(c, s, n, **k))

    rng = np.random.default_rng(SEED)
    print(TAG)
    ps = [rng.integers(3, 256, n).tolist() for n in (5, 9, 4, 7, 6, 8)]
    news = [3, 4, 3, 2, 24, 20]  # the first four end early: the last two move down
    ref = [fused.generate_ids(p, max_new_tokens=n, ignore_eos=True) for p, n in zip(ps, news)]
    late = rng.integers(3, 256, 40).tolist()  # needs a larger buffer than the first six
    late_ref = fused.generate_ids(late, max_new_tokens=30, ignore_eos=True)
    with Scheduler(static, SchedulerConfig(max_batch=8, prefill_chunk=16, slot_batch=True)) as sched:
        batch = sched.batch
        handles = [sched.submit(p, max_new_tokens=n, ignore_eos=True) for p, n in zip(ps, news)]
        outs = [[r.token for r in h if r.token is not None] for h in handles[:4]]
        capacity = batch.cache.capacity
        h_late = sched.submit(late, max_new_tokens=30, ignore_eos=True)
        outs += [[r.token for r in h if r.token is not None] for h in handles[4:]]
        late_out = [r.token for r in h_late if r.token is not None]
        stats = sched.stats()
    for i, (got, want) in enumerate(zip(outs, ref)):
        assert got == want, f"{TAG} request {i} differs from its single run on the fused graph"
    assert late_out == late_ref, f"{TAG} the request that grew the buffer differs from its single run"
    assert stats.blocks_used == 0 and stats.requests_finished == 7
    assert batch.cache.capacity > capacity, "the 70-token request did not move the rows into a larger buffer"
    in_place = [c.batch for c in prefilled if c.owner is not None]  # prefill caches that are views of the buffer
    assert sum(in_place) == 6, f"the six short prompts were not all prefilled in free slots: {in_place}"
    # joins from in-place prefills move nothing: only the chunked late prompt (its own cache) is
    # moved into a slot when it joins; the other moves are moves down (every row of one in one
    # move) and the copy into the larger buffer (rows [0, top), once)
    joins = [m for m in moves if m[3]]
    assert len(joins) == 1 and not joins[0][0] and len(joins[0][1]) == 1, f"joins moved rows: {moves}"
    down = [m for m in moves if m[0]]
    assert down and any(min(at) < 2 for _, _, at, _ in down), f"no row moved down: {moves}"
    for _, rows, at, _ in down:  # each compaction: one run of targets, every row moving down
        assert at == list(range(at[0], at[0] + len(at))) and all(r > a for r, a in zip(rows, at)), moves
    assert len(copies) <= 1, f"rows copied other than into a larger buffer, once: {copies}"
    decode_sizes = sorted({n for _, n, d in views if d})
    assert set(decode_sizes) <= set(cuda_graphs.BUCKETS), decode_sizes


def test_cancelled_rows_free_their_slots(static, fused):
    rng = np.random.default_rng(SEED + 1)
    ps = [rng.integers(3, 256, n).tolist() for n in (6, 6, 6)]
    ref = fused.generate_ids(ps[2], max_new_tokens=12, ignore_eos=True)
    with Scheduler(static, SchedulerConfig(max_batch=2, prefill_chunk=16, slot_batch=True)) as sched:
        a = sched.submit(ps[0], max_new_tokens=200, ignore_eos=True)
        b = sched.submit(ps[1], max_new_tokens=200, ignore_eos=True)
        a.get(30), b.get(30)
        a.cancel()
        c = sched.submit(ps[2], max_new_tokens=12, ignore_eos=True)
        out = [r.token for r in c if r.token is not None]
        b.cancel()
    assert out == ref, f"{TAG} a request in a reused slot differs from its single run"


def test_overlapped_greedy_steps_stop_on_a_stop_id_with_nothing_extra(static, fused):
    """Plain greedy batches start each forward before the host has looked at the last tokens: a
    row that a stop id ends was fed one more token, which must not reach its reader."""
    rng = np.random.default_rng(SEED + 2)
    ps = [rng.integers(3, 256, n).tolist() for n in (5, 8, 11, 6)]
    refs = [fused.generate_ids(p, max_new_tokens=24, ignore_eos=True) for p in ps]
    stops = [ref[3 + i] for i, ref in enumerate(refs)]  # each row ends on its own step
    want = [ref[:ref.index(stop) + 1] for ref, stop in zip(refs, stops)]
    steps = []
    with Scheduler(static, SchedulerConfig(max_batch=4, prefill_chunk=16, slot_batch=True)) as sched:
        assert sched.batch.overlap
        real = sched.batch._overlapped
        sched.batch._overlapped = lambda *a: steps.append(1) or real(*a)
        handles = [sched.submit(p, max_new_tokens=24, ignore_eos=True, stop_token_ids=[s]) for p, s in zip(ps, stops)]
        outs = [[r for r in h] for h in handles]
    assert steps, "no decode step overlapped"
    for i, (pieces, w) in enumerate(zip(outs, want)):
        assert [r.token for r in pieces if r.token is not None] == w, f"{TAG} row {i}: tokens after its stop id"
        assert pieces[-1].finish_reason == "stop"


def test_a_failed_overlapped_forward_ends_every_open_request_and_the_next_one_runs(static, fused):
    """Overlapped steps run their forward on the step loop's thread (the previous tokens' picks on
    a worker): a forward that fails there ends every open request with that error, and the
    scheduler serves the next request as before."""
    import threading

    from _serving import EngineSpy

    rng = np.random.default_rng(SEED + 3)
    print(TAG)
    ps = [rng.integers(3, 256, n).tolist() for n in (5, 8, 6)]
    threads, decodes = set(), [0]

    def before(ids, *_):
        if ids.shape[1] == 1:
            threads.add(threading.current_thread().name)
            decodes[0] += 1
            if decodes[0] == 6:
                raise RuntimeError("device lost")

    late = rng.integers(3, 256, 7).tolist()
    with Scheduler(static, SchedulerConfig(max_batch=4, prefill_chunk=16, slot_batch=True)) as sched:
        real, overlapped = sched.engine, []
        sched.engine = EngineSpy(real, before)
        step = sched.batch._overlapped
        sched.batch._overlapped = lambda *a: overlapped.append(1) or step(*a)
        handles = [sched.submit(p, max_new_tokens=30, ignore_eos=True) for p in ps]
        for h in handles:
            with pytest.raises(Exception, match="device lost"):
                for _ in h:
                    pass
        sched.engine = real
        out = [r.token for r in sched.submit(late, max_new_tokens=5, ignore_eos=True) if r.token is not None]
        stats = sched.stats()
    assert overlapped and decodes[0] == 6 and threads == {"portable-infer-scheduler"}, (overlapped, decodes, threads)
    assert out == fused.generate_ids(late, max_new_tokens=5, ignore_eos=True), TAG
    assert stats.requests_failed == 3 and stats.blocks_used == 0


@pytest.mark.parametrize("on_device", [False, True])
def test_the_kv_budget_bounds_the_buffer_and_longer_requests_are_refused(static, fused, monkeypatch, on_device):
    """Slots are max_batch equal rows of one buffer: the budget over max_batch is what a request may
    hold. A longer one is a ContextLengthError that says so; a chunked prompt prefilled in a longer
    cache of its own (64 tokens on the CPU) moves into the buffer's 48-token rows."""
    from portable_infer.errors import ContextLengthError

    if on_device:
        from portable_infer.engine.rows import RowMover

        mover = RowMover(static.engine.session, static.engine.ort, static.engine.variant.kv.dtype)
        monkeypatch.setattr(static.engine, "row_mover", lambda: mover)
    rng = np.random.default_rng(SEED + 3)
    print(TAG)
    ps = [rng.integers(3, 256, n).tolist() for n in (30, 7, 9)]  # the first is chunked (prefill_chunk 16)
    news = [18, 20, 12]
    refs = [fused.generate_ids(p, max_new_tokens=n, ignore_eos=True) for p, n in zip(ps, news)]
    with Scheduler(static, SchedulerConfig(max_batch=4, prefill_chunk=16, slot_batch=True,
                                           kv_budget_tokens=4 * 48)) as sched:
        assert sched.row_limit == 48
        with pytest.raises(ContextLengthError, match="needs 49 KV tokens .* one request may hold 48 here"):
            sched.submit(ps[0], max_new_tokens=19, ignore_eos=True)
        handles = [sched.submit(p, max_new_tokens=n, ignore_eos=True) for p, n in zip(ps, news)]
        outs = [[r.token for r in h if r.token is not None] for h in handles]
        assert sched.batch.cache.capacity == 48  # rounded up to the limit, not past it
    for i, (got, want) in enumerate(zip(outs, refs)):
        assert got == want, f"{TAG} request {i} differs from its single run on the fused graph"


def test_max_model_len_bounds_the_slots_below_their_share_of_the_budget(static, fused, monkeypatch):
    """max_model_len (vLLM's: prompt + max_tokens a request may hold) sets the slots' length where
    the budget's share would be longer: the startup warm-up makes the buffer that long, not the
    share (a static graph's decode step reads the whole buffer); a longer request is refused and
    the others give their single runs' tokens."""
    from portable_infer.errors import ContextLengthError

    rng = np.random.default_rng(SEED + 13)
    print(TAG)
    ps = [rng.integers(3, 256, int(n)).tolist() for n in rng.integers(4, 12, 3)]
    refs = [fused.generate_ids(p, max_new_tokens=12, ignore_eos=True) for p in ps]
    monkeypatch.setattr(static.engine, "cuda_graph", True)  # the warm-up runs (as on a GPU)
    with Scheduler(static, SchedulerConfig(max_batch=4, prefill_chunk=16, slot_batch=True, max_model_len=40,
                                           kv_budget_tokens=4 * 128)) as sched:
        assert sched.row_limit == 40 and sched.batch.cache.capacity == 40, (TAG, sched.batch.cache.capacity)
        with pytest.raises(ContextLengthError, match="needs 41 KV tokens .* one request may hold 40 here"):
            sched.submit(ps[0], max_new_tokens=41 - len(ps[0]), ignore_eos=True)
        outs = [[r.token for r in h if r.token is not None]
                for h in [sched.submit(p, max_new_tokens=12, ignore_eos=True) for p in ps]]
        assert sched.batch.cache.capacity == 40, TAG
    assert outs == refs, f"{TAG} requests under max_model_len differ from their single runs"


def test_a_budget_without_room_for_a_slot_is_refused(static):
    from portable_infer.errors import InvalidArgumentError

    with pytest.raises(InvalidArgumentError, match="leaves each of max_batch=16 slots 1 tokens"):
        Scheduler(static, SchedulerConfig(max_batch=16, slot_batch=True, kv_budget_tokens=16))
    with Scheduler(static, SchedulerConfig(max_batch=16, kv_budget_tokens=16)) as restacked:  # the CPU's default
        assert restacked.row_limit is None


def test_an_engine_with_cuda_graphs_makes_every_decode_bucket_ready_before_the_first_request(static, fused,
                                                                                            monkeypatch):
    """Where the engine captures CUDA graphs, the scheduler's slot batch runs one step of free
    slots per decode bucket at startup (the buffer at the row limit): requests then find every
    view made, the buffer never grows, and the tokens are the single runs' (on the CPU no graph is
    captured: the order and the views are what is shown here)."""
    rng = np.random.default_rng(SEED + 5)
    print(TAG)
    ps = [rng.integers(3, 256, n).tolist() for n in (11, 5, 8, 3, 6)]
    news = [9, 14, 6, 12, 10]
    refs = [fused.generate_ids(p, max_new_tokens=n, ignore_eos=True) for p, n in zip(ps, news)]
    made = []
    real_view = static.engine.view
    monkeypatch.setattr(static.engine, "view", lambda *a, **k: made.append(k.get("decode", False)) or real_view(*a, **k))
    monkeypatch.setattr(static.engine, "cuda_graph", True)
    with Scheduler(static, SchedulerConfig(max_batch=6, prefill_chunk=16, slot_batch=True,
                                           kv_budget_tokens=6 * 40)) as sched:
        batch = sched.batch
        assert sorted(batch._views) == [1, 2, 4, 6] and batch.cache.capacity == 40, (TAG, sorted(batch._views))
        views, buffer = dict(batch._views), batch.cache
        made.clear()
        handles = [sched.submit(p, max_new_tokens=n, ignore_eos=True) for p, n in zip(ps, news)]
        outs = [[r.token for r in h if r.token is not None] for h in handles]
        assert batch.cache is buffer and batch._views == views, TAG  # nothing regrown or remade
        assert made and not any(made), TAG  # prefills into free slots made views; no decode view was made
    assert outs == refs, TAG
    monkeypatch.setattr(static.engine, "cuda_graph", False)
    with Scheduler(static, SchedulerConfig(max_batch=6, slot_batch=True, kv_budget_tokens=6 * 40)) as sched:
        assert sched.batch.cache is None and not sched.batch._views  # no graphs: made on demand


def test_the_startup_warm_up_leaves_every_slot_free(static):
    """The warm-up (every decode bucket, then a thrown-away grouped prefill into free slots) that
    the server runs before the first request on GPUs: the slots stay free and the requests after
    it give single runs' tokens."""
    rng = np.random.default_rng(SEED + 11)
    ps = [rng.integers(3, 256, int(n)).tolist() for n in (9, 30, 17)]
    want = [static.generate_ids(p, max_new_tokens=12, ignore_eos=True) for p in ps]
    with Scheduler(static, SchedulerConfig(max_batch=4, slot_batch=True, kv_budget_tokens=4 * 64)) as sched:
        batch = sched.batch
        sizes = batch.warm_up(prefill=100)
        assert sizes == [1, 2, 4] and batch.slots == [None] * 4 and batch.lengths.tolist() == [1] * 4
        got = [[r.token for r in sched.submit(p, max_new_tokens=12, ignore_eos=True)] for p in ps]
    assert got == want, f"{TAG} requests after the warm-up differ from single runs"


def test_the_startup_line_says_what_the_kv_budget_holds(static):
    """serve prints what its KV budget holds: tokens and blocks, requests of the whole context at
    once, and with slots the tokens one request may hold (the scheduler's own figures)."""
    from portable_infer.serving.scheduler_setup import budget_line

    with Scheduler(static, SchedulerConfig(max_batch=4, prefill_chunk=16, slot_batch=True,
                                           kv_budget_tokens=4 * 48)) as sched:
        line = budget_line(sched.stats(), sched.max_context, sched.row_limit)
    ctx = static.max_context
    assert line.startswith(f"KV budget: 192 tokens (12 blocks of 16): {192 // ctx:,} requests of the whole context "
                           f"({ctx:,} tokens) at once; 4 slots of 48 tokens"), line
    with Scheduler(static, SchedulerConfig(max_batch=4, kv_budget_tokens=4 * ctx)) as restacked:
        line = budget_line(restacked.stats(), restacked.max_context, restacked.row_limit)
    assert f"4 requests of the whole context ({ctx:,} tokens) at once (--kv-budget-tokens" in line and "slots" not in line
    with Scheduler(static, SchedulerConfig(max_batch=4, kv_budget_tokens=4 * ctx, max_model_len=50)) as restacked:
        line = budget_line(restacked.stats(), restacked.max_context, restacked.row_limit, slots=False)
    assert "; a request's prompt + max_tokens may hold 50 tokens (max_model_len)" in line and "slots" not in line


@pytest.mark.parametrize("overlap", [False, True])
def test_rows_drawn_on_the_device_give_single_runs_tokens(static, fused, monkeypatch, overlap):
    """Sampling rows drawn by the sample graph where the logits are (the GPU default; here forced
    on the CPU), their first tokens at prefill too, in slot steps overlapped as plain greedy ones
    are (the next forward starts on the drawn ids before the host looks at them) or not, beside
    a greedy row, a row whose logits come over (logprobs) and a row that ends on a stop id: each
    seeded request gives its single run's tokens on the fused graph, drawn on the host."""
    from portable_infer.engine.device_sample import DeviceSampler

    rng = np.random.default_rng(SEED + 5)
    print(TAG)
    monkeypatch.setattr(static.engine, "samples_on_device", True)
    ps = [rng.integers(3, 256, n).tolist() for n in rng.integers(4, 14, 6)]
    filters = [dict(), dict(top_k=20), dict(top_p=0.9), dict(min_p=0.05, top_p=0.95), dict(top_k=40, top_p=0.8)]
    kws = [dict(max_new_tokens=int(rng.integers(10, 24)), ignore_eos=True, temperature=float(rng.uniform(0.6, 1.3)),
                seed=int(rng.integers(1000)), **filters[i % len(filters)]) for i in range(len(ps))]
    kws[4] = dict(max_new_tokens=16, ignore_eos=True)  # greedy
    kws[5].update(logprobs=1, max_new_tokens=5)  # its logits come over; after it ends the steps overlap
    alone = fused.generate_ids(ps[2], **kws[2])
    kws[2].update(stop_token_ids=[alone[6]])
    want = [fused.generate_ids(p, **kw) for p, kw in zip(ps, kws)]
    runs, steps, real = [], [], DeviceSampler.sample
    monkeypatch.setattr(DeviceSampler, "sample", lambda self, *a: runs.append(len(a[1])) or real(self, *a))
    with Scheduler(static, SchedulerConfig(max_batch=8, prefill_chunk=16, slot_batch=True)) as sched:
        sched.batch.overlap = overlap
        step = sched.batch._overlapped
        sched.batch._overlapped = lambda *a: steps.append(a[0]) or step(*a)
        handles = [sched.submit(p, **kw) for p, kw in zip(ps, kws)]
        got = [[r.token for r in h if r.token is not None] for h in handles]
    assert got == want, f"{TAG} rows drawn on the device differ from their single runs"
    assert sum(runs) >= sum(len(w) for w in want[:4]), f"{TAG} draws on the device: {runs}"
    assert ("sample" in steps) == overlap, f"{TAG} overlapped steps: {steps}"
