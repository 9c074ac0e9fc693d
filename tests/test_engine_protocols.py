"""The engine package's protocols: both engines and both caches implement Engine and KVCache, their
row operations agree, and what an engine cannot do is refused (no ignored parameters).

Runs on the tiny random llama (fp32): the growing engine on its fused and portable graphs, the
static engine on its static graph. Prompts come from a seed printed in every assertion message;
rerun one with ``ENGINE_SEED=<seed> pytest tests/test_engine_protocols.py``.
"""

from __future__ import annotations

import os
import random
import re
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")

import portable_infer  # noqa: E402
from portable_infer.engine import Engine, KVCache  # noqa: E402
from portable_infer.engine.devices import device_of  # noqa: E402
from portable_infer.engine.growing import GrowingEngine  # noqa: E402
from portable_infer.engine.kv_growing import GrowingCache  # noqa: E402
from portable_infer.engine.kv_static import StaticCache  # noqa: E402
from portable_infer.engine.memory import bytes_per_token  # noqa: E402
from portable_infer.engine.static import StaticEngine  # noqa: E402
from portable_infer.errors import CapacityError, InvalidArgumentError  # noqa: E402

SEED = int(os.environ.get("ENGINE_SEED") or random.SystemRandom().randrange(2**31))
TAG = f"[ENGINE_SEED={SEED}]"
print(f"tests/test_engine_protocols.py: {TAG}")
RUNTIME = Path(portable_infer.__file__).resolve().parent


@pytest.fixture(scope="module")
def models(tiny_llama, load_variant):
    """name -> Model: the growing engine on the fused and portable graphs, the static engine."""
    fused = portable_infer.load(tiny_llama.package, "cpu", static_kv=False, intra_op_threads=2)
    static = portable_infer.load(tiny_llama.package, "cpu", static_kv=True, intra_op_threads=2)
    assert (fused.variant, static.variant) == ("fused", "static")
    return {"fused": fused, "portable": load_variant(tiny_llama.package, "portable"), "static": static}


def prompts(rng, lengths) -> list:
    return [rng.integers(3, 256, int(n)).tolist() for n in lengths]  # never pad, bos or eos


def left_padded(ps: list) -> tuple:
    width = max(map(len, ps))
    ids, mask = np.zeros((len(ps), width), np.int64), np.zeros((len(ps), width), np.int64)
    for i, p in enumerate(ps):
        ids[i, width - len(p):], mask[i, width - len(p):] = p, 1
    return ids, mask


def members(protocol) -> dict:
    """The protocol's declared attributes (name -> annotation) and methods (name -> None)."""
    out = dict(protocol.__annotations__)
    out.update({n: None for n, v in vars(protocol).items()
                if not n.startswith("_") and (callable(v) or isinstance(v, property))})
    return out


# --- the protocols ------------------------------------------------------------------------------
def test_both_engines_and_both_caches_implement_the_protocols(models):
    assert not isinstance(object(), Engine) and not isinstance(object(), KVCache)  # the check can fail
    kinds = {"fused": (GrowingEngine, GrowingCache), "portable": (GrowingEngine, GrowingCache),
             "static": (StaticEngine, StaticCache)}
    engine_members, cache_members = members(Engine), members(KVCache)
    assert {"forward", "new_cache", "trim", "greedy_on_device", "device", "provider", "variant"} <= set(engine_members)
    assert {"merge", "take", "prompt_kv", "fill_prefix", "nbytes", "bytes_per_token", "rows", "length",
            "capacity"} <= set(cache_members)
    for name, model in models.items():
        engine = model.engine
        cache = engine.new_cache(2, capacity=24)
        assert (type(engine), type(cache)) == kinds[name], name
        assert isinstance(engine, Engine) and isinstance(cache, KVCache), name
        for attr in engine_members:
            assert hasattr(engine, attr), f"{name} engine lacks {attr}"
        for attr in cache_members:
            assert hasattr(cache, attr), f"{name} cache lacks {attr}"
        # declared attributes have their declared kinds (not just some value)
        assert isinstance(engine.greedy_on_device, bool) and isinstance(engine.device, str), name
        assert isinstance(engine.masks_on_device, bool) and isinstance(engine.samples_on_device, bool), name
        assert not engine.samples_on_device, name  # on the CPU numpy draws: the graph only off it
        assert engine.provider == "CPUExecutionProvider" and engine.device == "cpu", name
        assert engine.max_context == model.max_context == 256, name
        assert (cache.batch, cache.length, cache.rows.tolist()) == (2, 0, [0, 0]), name
        assert cache.capacity >= 24 and cache.bytes_per_token == bytes_per_token(engine.variant.kv), name
    assert models["static"].engine.greedy_on_device and not models["fused"].engine.greedy_on_device


def test_callers_use_the_protocols_not_the_concrete_kinds():
    """No caller outside engine/ asks which engine or cache it holds."""
    probe = re.compile(r"isinstance\([^)]*(KVCache|GrowingCache|StaticCache|GrowingEngine|StaticEngine)\b"
                       r"|getattr\([^)]*greedy_on_device")
    hits = [f"{p.relative_to(RUNTIME)}:{i}: {line.strip()}"
            for p in sorted(RUNTIME.rglob("*.py")) if "engine" not in p.relative_to(RUNTIME).parts
            for i, line in enumerate(p.read_text().splitlines(), 1) if probe.search(line)]
    assert not hits, hits


def test_one_device_map_for_both_engines(models):
    assert device_of("CUDAExecutionProvider") == device_of("TensorrtExecutionProvider") == "cuda"
    assert device_of("CPUExecutionProvider") == device_of("OpenVINOExecutionProvider") == "cpu"
    import onnxruntime as ort

    # made on the CPU session (nothing is allocated before new_cache): only the device map is read
    fused, static = models["fused"].engine, models["static"].engine
    trt = "TensorrtExecutionProvider"
    assert GrowingEngine(fused.session, fused.variant, trt, ort, max_context=16).device == "cuda"
    assert StaticEngine(static.session, static.variant, trt, ort, max_context=16, vocab_size=256).device == "cuda"


# --- row operations -----------------------------------------------------------------------------
def decode(engine, cache, mask, tokens, steps: int) -> tuple:
    """``steps`` greedy steps from ``tokens`` (each row's last pick); returns (picks [steps, B], mask)."""
    picks = []
    for _ in range(steps):
        mask = np.concatenate([mask, np.ones((len(tokens), 1), np.int64)], axis=1)
        tokens = engine.forward(np.asarray(tokens, np.int64)[:, None], mask, cache).argmax(-1)
        picks.append(tokens.tolist())
    return np.asarray(picks), mask


def join_and_leave(engine, ps: list, steps: int) -> tuple:
    """Rows 0-1 prefill together, row 2 alone, then join; decode; rows [2, 0] stay; decode.
    Returns (tokens per prompt, [(rows, length) after each operation])."""
    a_ids, a_mask = left_padded(ps[:2])
    b_ids, b_mask = left_padded(ps[2:])
    a, b = engine.new_cache(2, capacity=64), engine.new_cache(1, capacity=40)
    first = np.concatenate([engine.forward(a_ids, a_mask, a).argmax(-1), engine.forward(b_ids, b_mask, b).argmax(-1)])
    cache, mask = a.merge(a_mask, b, b_mask)
    shapes = [(cache.rows.tolist(), cache.length, cache.batch)]
    assert mask.shape == (3, cache.length)
    mid, mask = decode(engine, cache, mask, first, steps)
    cache, mask = cache.take(mask, [2, 0])
    shapes.append((cache.rows.tolist(), cache.length, cache.batch))
    assert mask.shape == (2, cache.length)
    end, _ = decode(engine, cache, mask, mid[-1][[2, 0]], steps)
    out = {i: [int(first[i]), *mid[:, i].tolist()] for i in range(3)}
    out[2] += end[:, 0].tolist()
    out[0] += end[:, 1].tolist()
    return out, shapes


def test_join_and_leave_agree_between_the_caches_and_with_single_runs(models):
    rng = np.random.default_rng(SEED)
    ps = prompts(rng, rng.integers(2, 14, 3))
    steps = 5
    got = {name: join_and_leave(models[name].engine, ps, steps) for name in ("fused", "static")}
    (grow, grow_shapes), (fixed, fixed_shapes) = got["fused"], got["static"]
    assert grow == fixed, f"{TAG} prompts {list(map(len, ps))}: growing {grow} vs static {fixed}"
    assert grow_shapes == fixed_shapes, f"{TAG} rows/length/batch differ: {grow_shapes} vs {fixed_shapes}"
    lengths = [len(p) for p in ps]
    assert grow_shapes[0][0] == lengths and grow_shapes[1][0] == [lengths[2] + steps, lengths[0] + steps]
    single = [models["fused"].generate_ids(p, max_new_tokens=len(grow[i]), ignore_eos=True) for i, p in enumerate(ps)]
    assert [grow[i] for i in range(3)] == single, f"{TAG} joined/left rows differ from their single runs"


def test_prompt_kv_fills_a_prefix_that_continues_like_the_full_prompt(models):
    rng = np.random.default_rng(SEED + 1)
    ps = prompts(rng, [11, 6])
    rest = prompts(rng, [5])[0]
    for name in ("fused", "static"):
        engine = models[name].engine
        ids, mask = left_padded(ps)
        cache = engine.new_cache(2, capacity=32)
        engine.forward(ids, mask, cache)
        (kv,) = cache.prompt_kv(ps, [0])
        assert [k.shape for k, _ in kv] == [(1, 2, 11, 16)] * 2, name
        again = engine.new_cache(1, capacity=32)
        again.fill_prefix([(np.array(k), np.array(v)) for k, v in kv], 11)
        assert (again.rows.tolist(), again.length) == ([11], 11), name
        cont = np.asarray([rest], np.int64)
        got = engine.forward(cont, np.ones((1, 16), np.int64), again)
        full = np.asarray([ps[0] + rest], np.int64)
        want = engine.forward(full, np.ones_like(full), engine.new_cache(1, capacity=32))
        diff = float(np.abs(got - want).max())
        assert diff <= 1e-4, f"{TAG} {name}: a filled prefix continues {diff:.2e} off the full prompt"


# --- nothing ignored ----------------------------------------------------------------------------
def test_a_growing_cache_keeps_to_its_capacity(models):
    engine = models["fused"].engine
    cache = engine.new_cache(1, capacity=4)
    assert cache.capacity == 4 and engine.new_cache(1, capacity=10_000).capacity == engine.max_context
    ids = np.asarray([[5, 6, 7]], np.int64)
    engine.forward(ids, np.ones_like(ids), cache)
    engine.forward(np.asarray([[8]], np.int64), np.ones((1, 4), np.int64), cache)  # 4 tokens: full
    with pytest.raises(CapacityError, match="holds 4 tokens per row and a row needs 5"):
        engine.forward(np.asarray([[9]], np.int64), np.ones((1, 5), np.int64), cache)
    for bad in (0, -3, 2.5, True):
        with pytest.raises(InvalidArgumentError, match="capacity must be an int >= 1") as err:
            engine.new_cache(1, capacity=bad)
        assert err.value.param == "capacity"


def test_what_a_graph_cannot_give_is_refused(models):
    ids = np.asarray([[5, 6, 7]], np.int64)
    for name in ("fused", "static"):  # graphs that compute the last position's logits only
        engine = models[name].engine
        assert engine.variant.logits == "last"
        with pytest.raises(InvalidArgumentError, match="last position's logits only") as err:
            engine.forward(ids, np.ones_like(ids), engine.new_cache(1, capacity=8), all_logits=True)
        assert err.value.param == "all_logits", name
    fused = models["fused"].engine
    with pytest.raises(InvalidArgumentError, match="no next_token output") as err:
        fused.forward(ids, np.ones_like(ids), fused.new_cache(1, capacity=8), greedy=True)
    assert err.value.param == "greedy"
    with pytest.raises(InvalidArgumentError, match="returns its logits to the host") as err:
        fused.forward_on_device(ids, np.ones_like(ids), fused.new_cache(1, capacity=8))
    assert err.value.param == "masks_on_device" and not fused.masks_on_device
    static = models["static"].engine  # it can (its masked argmax), but on the CPU numpy is faster
    assert not static.masks_on_device
    picked = static.forward_on_device(ids, np.ones_like(ids), static.new_cache(1, capacity=8))
    host = static.forward(ids, np.ones_like(ids), static.new_cache(1, capacity=8))
    assert picked.pick(None)[0].tolist() == host.argmax(-1).tolist()
    portable = models["portable"].engine  # logits: all -> every position, which the last one ends
    assert portable.variant.logits == "all"
    every = portable.forward(ids, np.ones_like(ids), portable.new_cache(1, capacity=8), all_logits=True)
    last = portable.forward(ids, np.ones_like(ids), portable.new_cache(1, capacity=8))
    assert every.shape == (1, 3, 256) and np.array_equal(every[:, -1], last)
