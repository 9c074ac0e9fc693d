"""The paged variant (KV in a pool of blocks, a step's tokens packed), on CPU.

ONNX Runtime has PagedAttention on CUDA only, so these tests export the variant's standard-op
twin (``exporters.lowering.spec.PAGED_ATTENTION = "paged_reference"``: the same graph with the
attention spelled out) and check the graph, the engine, its caches and the scheduler's mixed
steps against transformers and against the static variant. The contrib op itself is checked on
an H200 by ``benchmarks/gpu_paged_check.py`` (docs/benchmarks.md, Session 18).
"""

from __future__ import annotations

import gc
import os
import random

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import portable_infer  # noqa: E402
from portable_infer.errors import (CapacityError, InvalidArgumentError, PackageError, PortableInferError,  # noqa: E402
                                   ProviderError)
from portable_infer.serving.scheduler import Scheduler, SchedulerConfig  # noqa: E402

SEED = int(os.environ.get("PAGED_SEED") or random.SystemRandom().randrange(2**31))
TAG = f"[PAGED_SEED={SEED}]"


def _export(source, out, attention: str, **kw):
    import exporters.lowering.spec as spec
    from exporters.export import export

    was, spec.PAGED_ATTENTION = spec.PAGED_ATTENTION, attention
    try:
        return export(source, out, precision="fp32", variants=("portable", "static", "paged"), **kw)
    finally:
        spec.PAGED_ATTENTION = was


@pytest.fixture(scope="module")
def package(tiny_llama, tmp_path_factory):
    """The reference twin, verified at export against transformers like every variant."""
    return _export(tiny_llama.source, tmp_path_factory.mktemp("paged") / "pkg", "paged_reference", verify=True)


@pytest.fixture(scope="module")
def paged(package):
    return portable_infer.load(package, "cpu", paged_kv=True, intra_op_threads=2)


@pytest.fixture(scope="module")
def static(package):
    return portable_infer.load(package, "cpu", intra_op_threads=2)


def prompts(rng, lengths):
    return [rng.integers(3, 256, int(n)).tolist() for n in lengths]


def test_selection_and_the_manifest(package, paged, static):
    v = paged.manifest.variant("paged")
    assert (paged.variant, type(paged.engine).__name__, static.variant) == ("paged", "PagedEngine", "static")
    assert (v.kv.growth, v.kv.layout, v.logits) == ("paged", "blocks", "last")
    assert [t.name for t in v.inputs][:1] == ["input_ids"] and "attention_mask" not in [t.name for t in v.inputs]
    report = paged.manifest.verification["paged"]
    assert report.greedy.identical_prefix == report.greedy.steps, f"export verification: {report}"


def test_packed_steps_of_any_lengths_match_transformers(paged, tiny_llama):
    """Prefills, chunks and decodes of six sequences mixed in each forward, blocks handed out in a
    shuffled order: each sequence's last logits equal transformers' over its whole text."""
    rng = np.random.default_rng(SEED)
    engine = engine_with_pool(paged, blocks=96, block_size=4, rng=rng)
    texts = {k: rng.integers(3, 256, int(rng.integers(4, 40))).tolist() for k in range(6)}
    caches = {k: engine.new_cache(1, capacity=64) for k in texts}
    done = dict.fromkeys(texts, 0)
    while any(done[k] < len(t) for k, t in texts.items()):
        chunks = []
        for k, t in texts.items():
            if done[k] < len(t) and rng.random() < 0.8:
                n = int(rng.integers(1, len(t) - done[k] + 1))
                chunks.append((k, t[done[k]:done[k] + n]))
                done[k] += n
        if not chunks:
            continue
        logits, token = engine.forward_packed([(caches[k], 0, toks) for k, toks in chunks])
        for (k, _), got, tok in zip(chunks, logits, token):
            with torch.no_grad():
                want = tiny_llama.model(torch.tensor([texts[k][:done[k]]])).logits[0, -1].numpy()
            assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max(), f"{TAG} sequence {k} at {done[k]}"
            assert tok == got.argmax(), TAG


def engine_with_pool(model, blocks: int, block_size: int, rng):
    engine = model.engine
    gc.collect()  # caches of earlier tests give their blocks back
    pool = engine.reserve(blocks, block_size)
    pool._free = rng.permutation(blocks).tolist()  # scattered blocks: tables are really followed
    return engine


def test_batches_equal_static_single_runs_and_transformers(paged, static, tiny_llama):
    rng = np.random.default_rng(SEED + 1)
    ps = prompts(rng, rng.integers(2, 30, 5))
    batched = paged.batch_generate_ids(ps, max_new_tokens=12)
    assert batched == [static.generate_ids(p, max_new_tokens=12) for p in ps], f"{TAG} paged batch differs"
    ref = tiny_llama.model.generate(torch.tensor([ps[0]]), max_new_tokens=12, do_sample=False)
    assert batched[0] == ref[0, len(ps[0]):].tolist(), f"{TAG} paged differs from transformers"


def test_take_and_merge_share_blocks_and_free_them(paged):
    rng = np.random.default_rng(SEED + 2)
    engine = engine_with_pool(paged, blocks=32, block_size=4, rng=rng)
    pool = engine.pool
    ids = np.array(prompts(rng, [6, 6, 6]))
    mask = np.ones_like(ids)
    a = engine.new_cache(3, capacity=32)
    engine.forward(ids, mask, a)
    assert pool.free == 32 - 6 and a.nbytes() == 6 * pool.block_bytes
    b, mask_b = a.take(mask, [0, 2])
    assert b.tables == [a.tables[0], a.tables[2]] and pool.refs[a.tables[0]].tolist() == [2, 2]
    with pytest.raises(PortableInferError, match="two caches hold"):  # row 0's last block is a's too
        engine.forward(np.array([[5], [6]]), np.concatenate([mask_b, np.ones((2, 1), np.int64)], 1), b)
    row1 = list(a.tables[1])
    del a
    gc.collect()
    assert pool.free == 32 - 4 and pool.refs[row1].tolist() == [0, 0]  # row 1's blocks are free again
    engine.forward(np.array([[5], [6]]), np.concatenate([mask_b, np.ones((2, 1), np.int64)], 1), b)
    c = engine.new_cache(1, capacity=32)
    engine.forward(np.array([[7, 8, 9]]), np.ones((1, 3), np.int64), c)
    merged, mask_m = b.merge(np.concatenate([mask_b, np.ones((2, 1), np.int64)], 1), c, np.ones((1, 3), np.int64))
    assert merged.tables == b.tables + c.tables and mask_m.shape == (3, 7) and merged.rows.tolist() == [7, 7, 3]
    with pytest.raises(InvalidArgumentError, match="block reference"):  # prefixes go by blocks, not host copies
        merged.prompt_kv([[5] * 7], [0])
    del b, c, merged
    gc.collect()
    assert pool.free == 32


def test_a_full_reserved_pool_is_a_capacity_error_and_a_first_cache_pool_grows(paged):
    rng = np.random.default_rng(SEED + 3)
    engine = engine_with_pool(paged, blocks=3, block_size=4, rng=rng)
    cache = engine.new_cache(1, capacity=64)
    with pytest.raises(CapacityError, match="free blocks"):
        engine.forward(np.array(prompts(rng, [13])), np.ones((1, 13), np.int64), cache)
    del cache
    gc.collect()
    engine.pool = None  # as a fresh engine: the first cache sizes the pool, which then grows
    small = engine.new_cache(1, capacity=8)
    blocks = engine.pool.blocks
    big = engine.new_cache(2, capacity=64)
    ps = prompts(rng, [40, 40])
    out = engine.forward(np.array(ps), np.ones((2, 40), np.int64), big, greedy=True)
    assert engine.pool.blocks > blocks and small.rows.tolist() == [0]
    alone = [paged.generate_ids(p, max_new_tokens=1) for p in ps]
    assert out.tolist() == [a[0] for a in alone], TAG


@pytest.mark.parametrize("overlap", [False, True])
def test_scheduler_mixes_prefills_into_decode_steps_like_single_runs(paged, static, overlap):
    """Off the CPU plain greedy steps overlap the host's picks with the device (forced here): the
    tokens are the same either way, stop ids and length limits included."""
    rng = np.random.default_rng(SEED + 4)
    ps = prompts(rng, rng.integers(2, 60, 10))
    kws = [dict(max_new_tokens=int(rng.integers(1, 20)), ignore_eos=True) for _ in ps]
    if not overlap:  # sampling rows: the host picks between steps
        kws[1].update(temperature=0.9, top_p=0.9, seed=5)
        kws[2].update(temperature=1.2, top_k=20, seed=9, presence_penalty=0.5)
    alone = static.generate_ids(ps[3], max_new_tokens=20, ignore_eos=True)
    kws[3].update(max_new_tokens=20, stop_token_ids=[alone[4]], ignore_eos=False)  # ends on a stop id
    want = [static.generate_ids(p, **kw) for p, kw in zip(ps, kws)]
    assert len(want[3]) <= 5, TAG
    with Scheduler(paged, SchedulerConfig(max_batch=6, prefill_chunk=16, kv_budget_tokens=2048)) as sched:
        sched.batch.overlap = overlap
        overlapped, real = [], sched.batch._overlap
        sched.batch._overlap = lambda *a: (overlapped.append(1), real(*a))[1]
        handles = [sched.submit(p, **kw) for p, kw in zip(ps, kws)]
        got = [[r.token for r in h] for h in handles]
        stats = sched.stats()
    assert got == want, f"{TAG} scheduler on paged KV differs from single static runs"
    assert stats.steps["mixed_steps"] > 0, f"{TAG} no prefill rode in a decode step: {stats.steps}"
    assert bool(overlapped) == overlap, f"{TAG} {len(overlapped)} overlapped steps"
    assert stats.blocks_used == 0 and paged.engine.pool.blocks == 2048 // 16
    gc.collect()
    pool = paged.engine.pool
    assert pool.free == pool.blocks - len(pool.prefixes.keys), "blocks still held after every request ended"
    pool.prefixes.evict(pool.blocks)  # the prompts' indexed blocks, held by nothing else, go back
    assert pool.free == pool.blocks and not pool.prefixes.index


def test_prompts_share_prefix_blocks_by_reference(paged, static):
    """A prompt starting with whole blocks an earlier prompt computed takes those blocks (no copy,
    no recompute) and gives the same tokens; blocks only the index holds make room when the pool
    runs short, with every block indexed after them."""
    rng = np.random.default_rng(SEED + 5)
    shared = prompts(rng, [40])[0]  # 2 whole blocks of 16 (and 8 tokens more)
    ps = [shared + prompts(rng, [n])[0] for n in (5, 9, 3)]
    want = [static.generate_ids(p, max_new_tokens=6, ignore_eos=True) for p in ps]
    gc.collect()
    paged.engine.reserve(40, 16)
    with Scheduler(paged, SchedulerConfig(max_batch=4, prefill_chunk=64, kv_budget_tokens=40 * 16)) as sched:
        got = [[r.token for r in sched.submit(ps[0], max_new_tokens=6, ignore_eos=True)]]
        first = dict(paged.engine.pool.prefixes.keys)  # its prompt's whole blocks, indexed
        handles = [sched.submit(p, max_new_tokens=6, ignore_eos=True) for p in ps[1:]]
        got += [[r.token for r in h] for h in handles]
        stats = sched.stats()
    assert got == want, f"{TAG} prefix-sharing rows differ from single runs"
    assert len(first) == 2 and stats.prefix_cache_hits == 2 and stats.prefix_cache_tokens == 2 * 32, stats
    blocks = paged.engine.pool.prefixes
    assert [blocks.match(p)[:2] for p in ps] == [list(first)] * 3, "the shared blocks are not the first prompt's"
    # a pool short of free blocks takes back the index's (least recently used first, chains whole)
    gc.collect()
    pool = paged.engine.pool
    held = len(blocks.keys)
    cache = paged.engine.new_cache(1, capacity=40 * 16)
    pool.extend(cache.tables[0], (pool.free + 1) * 16)
    assert len(blocks.keys) < held and all(blocks.index[k] == b for b, k in blocks.keys.items())
    assert all(parent == -1 or parent in blocks.keys for parent, _ in blocks.index)


def test_the_cuda_form_and_its_refusals(tiny_llama, tmp_path, package):
    """The shipped form: one PagedAttention per layer, for CUDA only; without CUDA it is not
    loaded on the CPU and not exported unverified."""
    import onnx
    import onnxruntime as ort

    pkg = _export(tiny_llama.source, tmp_path / "cuda", "paged", verify=False)
    graph = onnx.load(str(pkg / "model.paged.onnx"), load_external_data=False).graph
    nodes = [n for n in graph.node if n.op_type == "PagedAttention"]
    assert len(nodes) == 2 and {n.domain for n in nodes} == {"com.microsoft"}
    m = portable_infer.load(pkg, "cpu")
    assert m.manifest.variant("paged").providers == ("cuda",) and m.variant == "static"
    with pytest.raises(ProviderError, match="paged"):
        portable_infer.load(pkg, "cpu", paged_kv=True)
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        from portable_infer.errors import VerificationError

        with pytest.raises(VerificationError, match="CUDA provider"):
            _export(tiny_llama.source, tmp_path / "unverified", "paged", verify=True)
        assert not (tmp_path / "unverified").exists()
    with pytest.raises(PackageError, match="no paged variant"):
        portable_infer.load(tiny_llama.package, "cpu", paged_kv=True)


def test_the_budget_counts_in_the_pool_s_blocks(paged, static):
    """Admission counts what the pool holds: a paged pool's blocks are the budget's (128 tokens on
    CUDA, where PagedAttention measured faster with them; 16 elsewhere and for other KV)."""
    from portable_infer.serving.scheduler_setup import kv_pool

    kv_paged, kv_static = paged.engine.variant.kv, static.engine.variant.kv
    cfg = SchedulerConfig(kv_budget_tokens=4096)
    assert [kv_pool(cfg, kv_paged, d).block_size for d in ("cuda", "cpu")] == [128, 16]
    assert kv_pool(cfg, kv_static, "cuda").block_size == 16 and kv_pool(cfg, kv_paged, "cuda").total == 32
    assert kv_pool(SchedulerConfig(kv_budget_tokens=4096, block_size=32), kv_paged, "cuda").block_size == 32



def test_constrained_and_sampled_rows_pick_as_on_static_kv(package, tiny_text_package, tmp_path):
    """Grammar-constrained rows (greedy: the graph's argmax checked against the grammar, on the
    host's logits here; sampled), logprobs and free rows in one scheduler: the same tokens as the
    static variant's scheduler gives."""
    pytest.importorskip("llguidance")
    import dataclasses
    import shutil

    from portable_infer.decode.constraints import Constraint
    from portable_infer.decode.sampling import SamplingParams
    from portable_infer.package import manifest as mf

    pkg = tmp_path / "pkg"
    shutil.copytree(package, pkg)
    shutil.copy(tiny_text_package / "tokenizer.json", pkg / "tokenizer.json")
    m = mf.Manifest.load(pkg)
    dataclasses.replace(m, tokenizer=dataclasses.replace(m.tokenizer, file="tokenizer.json", config_file=None),
                        files=mf.file_entries(pkg)).save(pkg)
    rng = np.random.default_rng(SEED + 6)
    regex = Constraint.regex(r"[a-f]{3}-[0-9]{2,4}\.")
    schema = Constraint.json_schema({"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]})
    kw = dict(max_new_tokens=24, ignore_eos=True)
    params = [SamplingParams(constraint=regex, **kw), SamplingParams(**kw), SamplingParams(constraint=schema, **kw),
              SamplingParams(constraint=regex, temperature=0.8, seed=int(rng.integers(1000)), **kw),
              SamplingParams(logprobs=2, temperature=0.8, seed=int(rng.integers(1000)), **kw)]
    ps = prompts(rng, rng.integers(3, 20, len(params)))
    outs, checked = [], []
    for model in (portable_infer.load(pkg, "cpu", paged_kv=True), portable_infer.load(pkg, "cpu")):
        real = model.engine.forward_on_device
        model.engine.forward_on_device = lambda *a, **k: checked.append(model.variant) or real(*a, **k)
        with Scheduler(model, SchedulerConfig(max_batch=3, prefill_chunk=8)) as sched:  # 3 greedy rows first
            handles = [sched.submit_ids(p, sp) for p, sp in zip(ps, params)]
            outs.append([[r.token for r in h] for h in handles])
    assert outs[0] == outs[1], f"{TAG} paged and static schedulers differ under constraints"
    assert "paged" in checked, "no step checked the graph's argmax against a grammar on the paged engine"


class _Widest:
    """The paged engine, counting the most rows one forward packed."""

    def __init__(self, engine):
        self.inner, self.widest = engine, 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def forward_packed(self, chunks, greedy=False, **kw):
        self.widest = max(self.widest, len(chunks))
        return self.inner.forward_packed(chunks, greedy, **kw)


@pytest.mark.parametrize("overlap", [False, True])
def test_blocks_on_demand_preempt_and_recompute_like_single_runs(paged, static, overlap):
    """Paged KV admits a request by its prompt's blocks, not its max_new_tokens': more run at once
    than whole reservations allow. When the budget runs short the newest request is preempted and
    later recomputed from its prompt and output: every row still gives its single run's tokens
    (greedy, sampled with a seed, a stop id), and every block comes back."""
    rng = np.random.default_rng(SEED + 7)
    ps = prompts(rng, rng.integers(6, 30, 8))
    kws = [dict(max_new_tokens=int(rng.integers(30, 48)), ignore_eos=True) for _ in ps]
    if not overlap:
        kws[1].update(temperature=0.9, top_p=0.9, seed=3)
        kws[6].update(temperature=1.1, top_k=30, seed=11, frequency_penalty=0.4)
    alone = static.generate_ids(ps[4], max_new_tokens=40, ignore_eos=True)
    kws[4].update(max_new_tokens=40, stop_token_ids=[alone[25]], ignore_eos=False)
    want = [static.generate_ids(p, **kw) for p, kw in zip(ps, kws)]
    blocks, whole = 14, max(-(-(len(p) + kw["max_new_tokens"]) // 16) for p, kw in zip(ps, kws))
    gc.collect()
    cfg = SchedulerConfig(max_batch=8, prefill_chunk=16, kv_budget_tokens=blocks * 16)
    with Scheduler(paged, cfg) as sched:
        sched.batch.overlap = overlap
        sched.engine = counted = _Widest(sched.engine)
        handles = [sched.submit(p, **kw) for p, kw in zip(ps, kws)]
        got = [[r.token for r in h] for h in handles]
        stats = sched.stats()
    assert got == want, f"{TAG} preempted and recomputed rows differ from single runs"
    assert stats.requests_preempted > 0, f"{TAG} the budget never ran short: {stats}"
    assert counted.widest > blocks // whole, f"{TAG} at most {counted.widest} rows ran at once"
    assert stats.blocks_used == 0 and stats.requests_finished == len(ps), stats
    gc.collect()
    pool = paged.engine.pool
    assert pool.free == pool.blocks - len(pool.prefixes.keys), "blocks still held after every request ended"


@pytest.mark.parametrize("overlap", [False, True])
def test_rows_drawn_on_the_device_give_single_runs_tokens(package, static, monkeypatch, overlap):
    """Sampling rows of a paged batch drawn by the sample graph where the logits are (the CUDA
    default; here on the CPU), in decode steps on bucket buffers and in mixed steps beside
    prefills, greedy rows and a rows whose logits come over (logprobs): each seeded request gives
    the tokens of its single run on the static engine, drawn on the host."""
    from portable_infer.engine.device_sample import DeviceSampler

    rng = np.random.default_rng(SEED + 9)
    print(TAG)
    m = portable_infer.load(package, "cpu", paged_kv=True, intra_op_threads=2)
    m.engine.decode_graphs(capture=False)
    m.engine.samples_on_device = True
    ps = prompts(rng, rng.integers(3, 40, 7))
    filters = [dict(), dict(top_k=20), dict(top_p=0.9), dict(min_p=0.05, top_p=0.95), dict(top_k=50, top_p=0.8)]
    kws = [dict(max_new_tokens=int(rng.integers(8, 25)), ignore_eos=True, temperature=float(rng.uniform(0.6, 1.3)),
                seed=int(rng.integers(1000)), **filters[i % len(filters)]) for i in range(len(ps))]
    kws[5] = dict(max_new_tokens=12, ignore_eos=True)  # greedy
    kws[6].update(logprobs=2, max_new_tokens=6)  # its logits come over; after it ends the steps overlap
    want = [static.generate_ids(p, **kw) for p, kw in zip(ps, kws)]
    runs, real = [], DeviceSampler.sample
    monkeypatch.setattr(DeviceSampler, "sample", lambda self, *a: runs.append(len(a[1])) or real(self, *a))
    steps = []
    with Scheduler(m, SchedulerConfig(max_batch=6, prefill_chunk=16, kv_budget_tokens=1024)) as sched:
        sched.batch.overlap = overlap  # the next forward starts on the drawn ids (the GPU default)
        step = sched.batch._overlapped
        sched.batch._overlapped = lambda *a: steps.append(a[0]) or step(*a)
        handles = [sched.submit(p, **kw) for p, kw in zip(ps, kws)]
        got = [[r.token for r in h] for h in handles]
    assert got == want, f"{TAG} rows drawn on the device differ from single runs"
    assert ("sample" in steps) == overlap, f"{TAG} overlapped steps: {steps}"
    assert sum(runs) >= sum(kw["max_new_tokens"] - 1 for kw in kws[:5]), f"{TAG} draws on the device: {runs}"


def test_admission_keeps_a_watermark_while_requests_run():
    from types import SimpleNamespace as R

    from portable_infer.serving.scheduler_plan import Planner

    p = Planner(max_batch=8, prefill_chunk=16, max_context=256, watermark=2)
    waiting = [R(id=f"r{i}", blocks=3) for i in range(4)]
    assert p.admit(waiting, active=0, free_blocks=3) == ("r0",)  # nothing runs: no watermark kept
    assert p.admit(waiting, active=1, free_blocks=4) == ()
    assert p.admit(waiting, active=0, free_blocks=7) == ("r0",)  # the second would leave 1 < 2
    assert p.admit(waiting, active=0, free_blocks=8) == ("r0", "r1")


def test_decode_steps_on_fixed_bucket_buffers_like_single_runs(package, static):
    """The decode steps' CUDA-graph form, run plain on the CPU: rows rounded up to a bucket on
    fixed buffers, padding rows writing into the pool's spare block. Tokens equal single runs;
    no row ever holds the spare block."""
    rng = np.random.default_rng(SEED + 8)
    m = portable_infer.load(package, "cpu", paged_kv=True, intra_op_threads=2)
    m.engine.decode_graphs(capture=False)
    ps = prompts(rng, rng.integers(3, 40, 7))
    # long enough that rows overlap: the batch passes through counts that are not buckets (3, 5, 6),
    # which the padding check below needs (with 5-24 new tokens, some seeds never had one)
    kws = [dict(max_new_tokens=int(rng.integers(16, 25)), ignore_eos=True) for _ in ps]
    kws[2].update(temperature=0.8, top_p=0.95, seed=21)
    want = [static.generate_ids(p, **kw) for p, kw in zip(ps, kws)]
    graphs = m.engine.graphs
    steps, real = [], graphs.run
    graphs.run = lambda step, ids, *a: (steps.append(len(ids)), real(step, ids, *a))[1]
    with Scheduler(m, SchedulerConfig(max_batch=6, prefill_chunk=16, kv_budget_tokens=1024)) as sched:
        handles = [sched.submit(p, **kw) for p, kw in zip(ps, kws)]
        got = [[r.token for r in h] for h in handles]
        held = [b for t in sched.batch.cache.tables for b in t] if sched.batch.cache is not None else []
    bad = [(i, kws[i], next(k for k, (a, b) in enumerate(zip(g, w)) if a != b)) for i, (g, w) in enumerate(zip(got, want)) if g != w]
    assert got == want, f"{TAG} decode steps on bucket buffers differ from single runs: {bad}"
    pool = m.engine.pool
    made = sorted(graphs.steps)
    assert set(made) <= {(n, 16) for n in (1, 2, 4, 8)} and pool.spare == pool.blocks == 1024 // 16, (made, pool.spare)
    assert set(steps) - {1, 2, 4, 8} and pool.spare not in held, f"{TAG} no step with padding rows: {steps}"


def test_the_startup_warm_up_gives_its_blocks_back(package, static):
    """The paged batch's warm-up before the first request (decode buckets, then the largest mixed
    step on throwaway caches): every block comes back and later requests give single runs' tokens."""
    rng = np.random.default_rng(SEED + 12)
    m = portable_infer.load(package, "cpu", paged_kv=True, intra_op_threads=2)
    m.engine.decode_graphs(capture=False)
    ps = prompts(rng, [11, 26, 5])
    want = [static.generate_ids(p, max_new_tokens=10, ignore_eos=True) for p in ps]
    with Scheduler(m, SchedulerConfig(max_batch=4, prefill_chunk=16, kv_budget_tokens=1024)) as sched:
        pool = m.engine.pool
        sched.batch.warm_up(4, 64)
        gc.collect()
        assert pool.free == pool.blocks and sorted(m.engine.graphs.steps) == [(1, 16), (2, 16), (4, 16)]
        got = [[r.token for r in sched.submit(p, max_new_tokens=10, ignore_eos=True)] for p in ps]
    assert got == want, f"{TAG} requests after the warm-up differ from single runs"


def test_make_room_grows_rows_and_preempts_the_newest_live_request():
    """kv_demand.make_room on fake rows: two running rows need a block each, one is free; the
    newest live request (a prefilling one; a cancelled one is skipped: it gave its blocks back)
    goes back to the head of the queue with its prompt's blocks, and the rows grow."""
    from portable_infer.serving import kv_demand
    from portable_infer.serving.kvblocks import BlockPool as Budget
    from portable_infer.serving.scheduler_meter import Meter
    from portable_infer.serving.scheduler_plan import Planner
    from portable_infer.serving.scheduler_queues import RequestQueues

    class Req:
        def __init__(self, rid, state, blocks, submitted, prompt_len=6):
            self.id, self.state, self.blocks, self.submitted, self.prompt_len = rid, state, blocks, submitted, prompt_len

        def preempted(self):
            self.state = "waiting"

    class Batch:
        def __init__(self, rows, tokens):
            self.rows, self.tokens, self.left, self.forgot = rows, tokens, [], []

        def kv_after_step(self):
            return list(zip(self.rows, self.tokens))

        def flush(self):
            return []

        def leave(self, ids):
            self.left += ids

        def forget(self, ids):
            self.forgot += ids

    pool = Budget(10, 4)
    queues = RequestQueues(Planner(8, 16, 256), pool, Meter(), max_waiting=8)
    a, b = Req("a", "running", 4, 1.0), Req("b", "running", 3, 2.0)
    c, d = Req("c", "prefilling", 2, 3.0), Req("d", "done", 0, 4.0)
    queues.prefilling.extend([c, d])
    queues.active, pool.used = 3, 9
    batch = Batch([a, b], [17, 13])  # 5 and 4 blocks of 4 tokens after the step: one more each
    kv_demand.make_room(batch, queues)
    assert (a.blocks, b.blocks, pool.used, pool.free) == (5, 4, 9, 1)
    assert (c.state, c.blocks, list(queues.waiting), d.state) == ("waiting", 2, [c], "done")
    assert (batch.left, batch.forgot, queues.active, queues.meter.counters["requests_preempted"]) == (["c"], ["c"], 2, 1)
    kv_demand.make_room(batch, queues)  # nothing more to take: a no-op
    assert (a.blocks, b.blocks, pool.used) == (5, 4, 9)
