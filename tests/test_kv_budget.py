"""The serving KV budget sized from the GPU's memory (serving.kv_budget, engine.device_memory):
the CUDA runtime found and asked through stand-ins, the rule's arithmetic, and what is refused."""

from __future__ import annotations

import ctypes
import logging
from types import SimpleNamespace

import numpy as np
import pytest

from portable_infer.engine import device_memory
from portable_infer.engine.memory import bytes_per_token
from portable_infer.errors import InvalidArgumentError
from portable_infer.serving import kv_budget
from portable_infer.serving.scheduler_config import SchedulerConfig
from portable_infer.serving.scheduler_setup import budget_line, kv_pool

GIB = 1 << 30

MAPS = """\
55d0c0000000-55d0c0001000 r--p 00000000 08:01 1234                       /usr/bin/python3.12
7f10a0000000-7f10a0100000 r-xp 00000000 08:01 5678                       /opt/x/lib/libcublas.so.13
7f10b0000000-7f10b0100000 r-xp 00000000 08:01 9012                       /opt/x/nvidia/cu13/lib/libcudart.so.13
7ffd1c000000-7ffd1c021000 rw-p 00000000 00:00 0                          [stack]
7ffd1c100000-7ffd1c101000 rw-p 00000000 00:00 0
"""


def test_the_loaded_cuda_runtime_is_found_in_the_process_maps():
    assert device_memory.loaded_runtime(MAPS) == "/opt/x/nvidia/cu13/lib/libcudart.so.13"
    assert device_memory.loaded_runtime(MAPS.replace("libcudart", "libcudnn")) is None
    assert device_memory.loaded_runtime("") is None


class FakeRuntime:
    """The three CUDA runtime calls, as ctypes hands them over (by reference), with error codes."""

    def __init__(self, free, total, current=3, fail=""):
        self.free, self.total, self.current, self.fail = free, total, current, fail
        self.set_calls = []

    def cudaGetDevice(self, ref):
        if self.fail == "get":
            return 100
        ref._obj.value = self.current
        return 0

    def cudaSetDevice(self, dev):
        self.set_calls.append(dev.value)
        return 101 if self.fail == "set" and len(self.set_calls) == 1 else 0

    def cudaMemGetInfo(self, free, total):
        if self.fail == "info":
            return 2
        free._obj.value, total._obj.value = self.free, self.total
        return 0


def test_cuda_memory_asks_the_device_and_puts_the_current_one_back():
    x = ctypes.c_size_t(0)
    assert ctypes.byref(x)._obj is x  # what the stand-in writes through, as the real runtime does
    rt = FakeRuntime(free=100 * GIB, total=141 * GIB, current=3)
    assert device_memory.cuda_memory(1, rt) == (100 * GIB, 141 * GIB)
    assert rt.set_calls == [1, 3]


@pytest.mark.parametrize("fail", ["get", "set", "info"])
def test_cuda_memory_is_none_when_the_runtime_answers_an_error(fail):
    rt = FakeRuntime(free=1, total=2, fail=fail)
    assert device_memory.cuda_memory(0, rt) is None
    if fail != "get":
        assert rt.set_calls[-1] == 3  # the current device put back


def test_cuda_memory_without_a_loaded_runtime_is_none(monkeypatch):
    monkeypatch.setattr(device_memory, "loaded_runtime", lambda maps=None: None)
    assert device_memory.cuda_memory(0) is None


def test_the_device_id_comes_from_the_sessions_provider_options():
    s = SimpleNamespace(get_provider_options=lambda: {"CUDAExecutionProvider": {"device_id": "2"}})
    assert device_memory.session_device_id(s, "CUDAExecutionProvider") == 2
    assert device_memory.session_device_id(s, "CPUExecutionProvider") == 0
    assert device_memory.session_device_id(object(), "CUDAExecutionProvider") == 0


@pytest.mark.parametrize("provider, device_id, refused", [("CUDAExecutionProvider", 1, True),
                                                         ("CUDAExecutionProvider", 0, False),
                                                         ("CPUExecutionProvider", 3, False)])
def test_an_engine_on_a_device_other_than_0_is_refused_where_engines_are_made(provider, device_id, refused,
                                                                               monkeypatch):
    """Every engine makes its buffers and binds its companions on device 0 (KV, step inputs, logits,
    the device draws): ``make_engine`` refuses a session on another device with a typed error
    that names CUDA_VISIBLE_DEVICES, instead of a forward failing later."""
    from portable_infer.engine import session as sessions

    monkeypatch.setattr(sessions, "GrowingEngine", lambda *a, **k: "the growing engine")
    session = SimpleNamespace(get_provider_options=lambda: {provider: {"device_id": str(device_id)}})
    sel = SimpleNamespace(session=session, provider=SimpleNamespace(ort_name=provider),
                          variant=SimpleNamespace(kv=SimpleNamespace(growth="unknown")))
    manifest = SimpleNamespace(model=SimpleNamespace(max_context=64))
    if refused:
        with pytest.raises(InvalidArgumentError, match=f"device_id={device_id} .* CUDA_VISIBLE_DEVICES={device_id}"):
            sessions.make_engine(sel, manifest, None)
    else:
        assert sessions.make_engine(sel, manifest, None) == "the growing engine"


# --- the rule --------------------------------------------------------------------------------------
def model(device="cuda", layers=4, kv_heads=2, head_dim=16, max_context=512, rng=None):
    rng = rng or np.random.default_rng(0)
    kv = SimpleNamespace(past=[f"past.{i}" for i in range(2 * layers)], num_kv_heads=kv_heads, head_dim=head_dim,
                         dtype="float16", growth="static")
    dims = SimpleNamespace(hidden_size=int(rng.integers(64, 256)), intermediate_size=int(rng.integers(256, 1024)),
                           num_heads=4, num_kv_heads=kv_heads, head_dim=head_dim, vocab_size=int(rng.integers(500, 5000)))
    engine = SimpleNamespace(device=device, variant=SimpleNamespace(kv=kv), provider="CUDAExecutionProvider",
                             session=SimpleNamespace(get_provider_options=lambda: {}))
    return SimpleNamespace(engine=engine, manifest=SimpleNamespace(model=dims), max_context=max_context)


def test_a_given_budget_is_kept_and_no_device_is_asked(monkeypatch):
    monkeypatch.setattr(kv_budget, "cuda_memory", lambda *a: pytest.fail("asked the device"))
    m = model()
    b = kv_budget.settle(SchedulerConfig(kv_budget_tokens=1234), m)
    assert (b.tokens, b.source) == (1234, "given")
    b = kv_budget.settle(SchedulerConfig(kv_budget_bytes=1 << 20), m)
    assert b.tokens == (1 << 20) // bytes_per_token(m.engine.variant.kv)
    assert kv_budget.settled(SchedulerConfig(kv_budget_bytes=1 << 20), b).kv_budget_bytes == 1 << 20


def test_on_the_cpu_the_fixed_default_stays(monkeypatch):
    monkeypatch.setattr(kv_budget, "cuda_memory", lambda *a: pytest.fail("asked the device"))
    cfg = SchedulerConfig()
    b = kv_budget.settle(cfg, model(device="cpu"))
    assert (b.tokens, b.source, b.describe()) == (None, "default", "")
    assert kv_budget.settled(cfg, b) is cfg


def test_unreadable_gpu_memory_keeps_the_default_and_says_so(monkeypatch, caplog):
    monkeypatch.setattr(kv_budget, "cuda_memory", lambda *a: None)
    with caplog.at_level(logging.WARNING, "portable_infer.serving"):
        b = kv_budget.settle(SchedulerConfig(), model())
    assert b.source == "default" and "kv_budget_tokens" in caplog.text


def test_the_device_budget_is_the_utilized_share_less_what_is_in_use_and_the_forwards():
    seed = int(np.random.SeedSequence().entropy % 2**32)
    print("seed", seed)
    rng = np.random.default_rng(seed)
    m = model(rng=rng, max_context=1 << 20)
    total = int(rng.integers(20, 160)) * GIB
    free = total - int(rng.integers(1, 10)) * GIB - int(rng.integers(0, GIB))
    cfg = SchedulerConfig(max_batch=int(rng.integers(1, 300)), prefill_chunk=int(rng.integers(16, 1024)),
                          gpu_memory_utilization=float(rng.uniform(0.7, 0.95)))
    b = kv_budget.settle(cfg, m, memory=(free, total))
    working = kv_budget.working_bytes(m.manifest.model, m.engine.variant.kv, cfg)
    room = int(cfg.gpu_memory_utilization * total) - (total - free) - working
    per_token = bytes_per_token(m.engine.variant.kv)
    assert b.source == "device" and b.tokens == min(room // per_token, cfg.max_batch * m.max_context)
    assert working >= kv_budget.WORKSPACE_FLOOR
    # what the budget, the weights and the forwards take stays within the share
    assert b.tokens * per_token + (total - free) + working <= cfg.gpu_memory_utilization * total
    settled = kv_budget.settled(cfg, b)
    assert (settled.kv_budget_tokens, settled.kv_budget_bytes) == (b.tokens, None)
    assert kv_pool(settled, m.engine.variant.kv, "cuda").total * 16 <= b.tokens
    assert "from the device" in b.describe() and "kept for the forwards" in b.describe()


def test_the_device_budget_stops_at_max_batch_requests_of_the_whole_context():
    m = model(max_context=256)
    b = kv_budget.settle(SchedulerConfig(max_batch=8), m, memory=(100 * GIB, 141 * GIB))
    assert b.tokens == 8 * 256


def test_the_device_budget_stops_at_max_batch_requests_of_max_model_len():
    """An automatic budget holds no more than max_batch requests of the most one may hold."""
    m = model(max_context=4096)
    b = kv_budget.settle(SchedulerConfig(max_batch=8, max_model_len=300), m, memory=(100 * GIB, 141 * GIB))
    assert b.tokens == 8 * 300


# --- max_model_len: what one request may hold, and the slots' length -------------------------------
def pool_of(tokens, block=16):
    return SimpleNamespace(total=tokens // block, block_size=block)


def test_max_model_len_bounds_requests_and_the_slots_but_never_past_their_share():
    from portable_infer.serving.scheduler_setup import row_limit

    seed = int(np.random.SeedSequence().entropy % 2**32)
    print("seed", seed)
    rng = np.random.default_rng(seed)
    ctx = int(rng.integers(1024, 8192))
    m = model(max_context=ctx, rng=rng)
    batch = int(rng.integers(2, 64))
    share = int(rng.integers(32, ctx))  # tokens a slot's share of the budget holds
    pool = pool_of(share * batch)
    share = pool.total * pool.block_size // batch  # rounded down to whole blocks
    want = int(rng.integers(2, ctx))
    slots = SchedulerConfig(max_batch=batch, slot_batch=True, max_model_len=want)
    assert row_limit(m.engine, slots, pool, ctx) == min(want, share)
    unset = SchedulerConfig(max_batch=batch, slot_batch=True)
    assert row_limit(m.engine, unset, pool, ctx) == share
    # a share over the context: the slots stop at the context (no buffer longer than a request can use)
    assert row_limit(m.engine, unset, pool_of(2 * ctx * batch), ctx) == ctx
    # a restacked batch has no slots: only max_model_len bounds a request
    restacked = SchedulerConfig(max_batch=batch, slot_batch=False, max_model_len=want)
    assert row_limit(m.engine, restacked, pool, ctx) == want
    assert row_limit(m.engine, SchedulerConfig(slot_batch=False), pool, ctx) is None


def test_a_max_model_len_over_the_context_or_too_short_is_refused():
    from portable_infer.serving.scheduler_setup import row_limit

    m = model(max_context=512)
    with pytest.raises(InvalidArgumentError, match="max_model_len=513 .* over the model's context .512 tokens"):
        row_limit(m.engine, SchedulerConfig(max_model_len=513), pool_of(4096), 512)
    for bad in (1, 0, -5, 2.5, True, "300"):
        with pytest.raises(InvalidArgumentError, match="max_model_len must be an int None or >= 2"):
            SchedulerConfig(max_model_len=bad)


@pytest.mark.parametrize("flags, want", [([], None), (["--max-model-len", "700"], 700),
                                         (["--max-prompt-tokens", "128", "--max-new-tokens", "256"], 384),
                                         (["--max-prompt-tokens", "128"], None),
                                         (["--max-prompt-tokens", "128", "--max-new-tokens", "256",
                                           "--max-model-len", "1000"], 1000)])
def test_serve_bounds_a_request_by_max_model_len_or_both_request_caps(flags, want):
    from portable_infer import cli
    from portable_infer.serving.scheduler_setup import max_model_len

    ns = cli.build_parser().parse_args(["serve", "--model", "nowhere", *flags])
    assert max_model_len(ns.max_model_len, ns.max_prompt_tokens, ns.max_new_tokens) == want


def test_no_room_for_kv_is_refused_with_what_to_change():
    m = model()
    with pytest.raises(InvalidArgumentError, match="gpu_memory_utilization=0.5 .* leaves no room for KV") as e:
        kv_budget.settle(SchedulerConfig(gpu_memory_utilization=0.5), m, memory=(10 * GIB, 40 * GIB))
    assert "kv_budget_tokens" in str(e.value)


@pytest.mark.parametrize("bad", [0, -0.1, 1.5, float("nan"), True, "0.9"])
def test_a_bad_utilization_is_refused(bad):
    with pytest.raises(InvalidArgumentError, match="gpu_memory_utilization"):
        SchedulerConfig(gpu_memory_utilization=bad)


@pytest.mark.parametrize("other", [{"kv_budget_tokens": 4096}, {"kv_budget_bytes": 1 << 30}])
def test_a_utilization_beside_a_budget_given_is_refused_not_ignored(other):
    with pytest.raises(InvalidArgumentError, match="not kv_budget_.* and gpu_memory_utilization"):
        SchedulerConfig(gpu_memory_utilization=0.8, **other)


def test_the_default_share_is_vllms_and_a_share_on_the_cpu_is_said_to_do_nothing(monkeypatch, caplog):
    m = model()
    memory = (120 * GIB, 140 * GIB)
    default = kv_budget.settle(SchedulerConfig(), m, memory=memory)
    explicit = kv_budget.settle(SchedulerConfig(gpu_memory_utilization=0.9), m, memory=memory)
    assert default == explicit and default.source == "device"
    monkeypatch.setattr(kv_budget, "cuda_memory", lambda *a: pytest.fail("asked the device"))
    with caplog.at_level(logging.WARNING, "portable_infer.serving"):
        assert kv_budget.settle(SchedulerConfig(gpu_memory_utilization=0.5), model(device="cpu")).source == "default"
    assert "applies on a GPU" in caplog.text


def test_the_device_use_after_the_warm_up_joins_the_startup_note(monkeypatch):
    m = model()
    b = kv_budget.settle(SchedulerConfig(), m, memory=(120 * GIB, 140 * GIB))
    warm = kv_budget.after_warm_up(b, memory=(14 * GIB, 140 * GIB))
    assert warm.warm_used == 126 * GIB and warm.tokens == b.tokens
    assert warm.describe().endswith("; 126.0 in use after the warm-up (90%)")
    monkeypatch.setattr(kv_budget, "cuda_memory", lambda *a: None)  # unreadable now: the note as it was
    assert kv_budget.after_warm_up(b) is b and "after the warm-up" not in b.describe()
    given = kv_budget.Budget(100, "given")
    assert kv_budget.after_warm_up(given, memory=(1, 2)) is given


def test_the_startup_line_says_how_the_budget_was_sized():
    stats = SimpleNamespace(blocks_total=100, block_size=16, max_batch=4)
    b = kv_budget.Budget(1600, "device", free=100 * GIB, total=141 * GIB, working=2 * GIB)
    line = budget_line(stats, 512, None, b.describe())
    assert "1,600 tokens" in line and "141.0 GiB, 41.0 in use after loading, 2.0 kept" in line
    assert line.endswith("--kv-budget-tokens sets it)")
    assert budget_line(stats, 512).endswith("(--kv-budget-tokens sets it)")


# --- KV buffers from a session's arena (engine.kv_alloc) -------------------------------------------
class CpuModelSession:
    """What DeviceZeros reads of a model session."""

    def get_providers(self):
        return ["CPUExecutionProvider"]

    def get_provider_options(self):
        return {"CPUExecutionProvider": {}}


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_device_zeros_are_zero_buffers_of_the_shape_and_dtype_asked(dtype):
    import onnxruntime as ort

    from portable_infer.engine.kv_alloc import DeviceZeros

    rng = np.random.default_rng()
    shape = [int(x) for x in rng.integers(1, 9, size=4)]
    print("shape", shape)
    z = DeviceZeros(CpuModelSession(), ort, "CPUExecutionProvider", "cpu")
    a, b = z.zeros(shape, dtype), z.zeros(shape, np.dtype(dtype))
    for v in (a, b):
        assert v.shape() == shape and v.device_name() == "cpu"
        assert v.numpy().dtype == np.dtype(dtype) and not v.numpy().any()
    assert a.data_ptr() != b.data_ptr()  # two buffers, not one output reused
    assert list(z._sessions) == [dtype]  # one companion session per dtype


def test_engines_take_device_kv_from_the_session_arena_and_cpu_kv_as_before():
    from portable_infer.engine.kv_alloc import KVBuffers

    made = []

    class FakeZeros:
        def zeros(self, shape, dtype):
            made.append((tuple(shape), np.dtype(dtype).name))
            return "device buffer"

    class OrtValue:
        @staticmethod
        def ortvalue_from_shape_and_type(shape, dtype, device, device_id):
            made.append(("ort", tuple(shape), device))
            return "host buffer"

    eng = KVBuffers()
    eng.ort = SimpleNamespace(OrtValue=OrtValue)
    eng.device = "cpu"
    assert eng.kv_buffer((1, 2, 3, 4), "float16") == "host buffer"
    eng.device, eng._zeros = "cuda", FakeZeros()
    assert eng.kv_buffer((1, 2, 3, 4), "float16") == "device buffer"
    assert made == [("ort", (1, 2, 3, 4), "cpu"), ((1, 2, 3, 4), "float16")]


def test_kv_buffers_fall_back_to_the_python_allocator_where_the_companion_cannot_run(caplog):
    from portable_infer.engine.kv_alloc import KVBuffers

    made = []

    class OrtValue:
        @staticmethod
        def ortvalue_from_shape_and_type(shape, dtype, device, device_id):
            made.append((tuple(shape), device))
            return "python-side buffer"

    eng = KVBuffers()
    eng.ort, eng.device, eng.provider = SimpleNamespace(OrtValue=OrtValue), "cuda", "CUDAExecutionProvider"
    eng.session = SimpleNamespace(get_provider_options=lambda: {})  # companion_session fails on this stand-in
    with caplog.at_level(logging.WARNING, "portable_infer.engine.kv_alloc"):
        assert eng.kv_buffer((2, 3, 4, 5), "float16") == "python-side buffer"
        assert eng.kv_buffer((2, 3, 4, 5), "float16") == "python-side buffer"
    assert made == [((2, 3, 4, 5), "cuda")] * 2 and eng._zeros is False
    assert caplog.text.count("Python-side allocator") == 1  # said once


def test_the_api_process_takes_the_budget_the_engine_process_settled():
    from portable_infer.serving.engine_process import settled_config

    given = SchedulerConfig(kv_budget_bytes=1 << 20)
    assert settled_config(given, {"kv_budget_tokens": None}) is given
    share = SchedulerConfig(gpu_memory_utilization=0.8, max_batch=7)
    got = settled_config(share, {"kv_budget_tokens": 877_000})
    assert (got.kv_budget_tokens, got.kv_budget_bytes, got.gpu_memory_utilization, got.max_batch) == \
        (877_000, None, None, 7)


def test_serve_refuses_both_budget_options_before_loading(capsys, monkeypatch):
    pytest.importorskip("fastapi")
    from portable_infer import cli

    monkeypatch.setattr(cli, "_load", lambda ns: pytest.fail("loaded a model"))
    rc = cli.main(["serve", "--model", "nowhere", "--kv-budget-tokens", "100", "--gpu-memory-utilization", "0.5"])
    assert rc == 2 and "not kv_budget_tokens and gpu_memory_utilization" in capsys.readouterr().err


def test_device_pools_are_made_and_grown_by_the_engines_maker():
    """A paged pool on a device takes its buffers from the engine's maker (engine.kv_alloc: the
    session arena), also when a first-cache pool grows through the host."""
    from portable_infer.engine.kv_paged import BlockPool

    class DeviceValue:  # what the pool uses of an OrtValue on a device
        def __init__(self, shape, dtype):
            self.array = np.zeros(shape, dtype)

        def update_inplace(self, a):
            assert a.shape == self.array.shape and a.dtype == self.array.dtype
            self.array[...] = a

        def numpy(self):
            return self.array.copy()

    made = []

    def make(shape, dtype):
        made.append(tuple(shape))
        return DeviceValue(shape, dtype)

    class NoPythonSideAllocation:
        @staticmethod
        def ortvalue_from_shape_and_type(*a):
            pytest.fail("a device pool went to ONNX Runtime's Python-side allocator")

        ortvalue_from_numpy = ortvalue_from_shape_and_type

    rng = np.random.default_rng()
    layers, heads, dim, block = int(rng.integers(1, 4)), 2, 8, 4
    kv = SimpleNamespace(past=[(f"k{i}", f"v{i}") for i in range(layers)], num_kv_heads=heads, head_dim=dim,
                         dtype="float16")
    pool = BlockPool(kv, SimpleNamespace(OrtValue=NoPythonSideAllocation), "cuda", 3, block, make=make)
    assert made == [(3, block, heads, dim)] * (2 * layers)
    held = rng.standard_normal((3, block, heads, dim)).astype(np.float16)
    pool.values[0][1].update_inplace(held)
    pool.grow(5)
    assert made[-1] == (5, block, heads, dim) and len(made) == 4 * layers
    grown = pool.values[0][1].numpy()
    np.testing.assert_array_equal(grown[:3], held)  # the held blocks kept, through the host
    assert not grown[3:].any()
