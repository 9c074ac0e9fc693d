"""The exact static graph's batched companion on the CPU (engine/dense_companion.py): exported
beside the static graph from the portable graph's own blocks, folded into fp32 MatMuls at load,
attached where a batch above one is declared, and run for every forward of more than one token
while single-row steps stay on the exact graph. Against the engine without it, on a tiny Q4_1
GGUF (offsets folded into the weights) and a float source's int4 export."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from portable_infer.engine import dense_companion, host
from portable_infer.package import manifest as mf
from portable_infer.package.variants import STATIC_DENSE

SEED = int(os.environ.get("DENSE_SEED", np.random.SeedSequence().entropy % 2**31))


@pytest.fixture(scope="module")
def q4_1_package(tmp_path_factory):
    from exporters.export import export
    from test_int4_form import GGUF_SEED, write_tiny_gguf

    root = tmp_path_factory.mktemp("dense")
    gguf = root / "tiny-Q4_1.gguf"
    write_tiny_gguf(gguf, "Q4_1", GGUF_SEED["Q4_1"])
    return export(gguf, root / "pkg")  # the default variants: a small int4 model gets the companion


@pytest.fixture(scope="module")
def float_int4_package(tiny_llama, tmp_path_factory):
    from exporters.export import export

    return export(tiny_llama.source, tmp_path_factory.mktemp("dense-f") / "pkg", precision="int4",
                  variants=("portable", "static", STATIC_DENSE), verify=False)


def _load(pkg: Path, batch: int):
    import portable_infer

    return portable_infer.load(pkg, providers="cpu", check="size", static_kv=True, accuracy_level=1,
                               tune_batch=batch, intra_op_threads=1)


def test_default_export_writes_it_from_the_portable_blocks(q4_1_package):
    """Default int4 export of a small model: ``static-dense`` is in the manifest (CPU only), verified
    like every graph, and adds no weight file of its own: in the portable graph's, every
    initializer it stores beyond the portable graph's is a rotary table (no second copy of a block)."""
    manifest = mf.Manifest.load(q4_1_package)
    dense = manifest.variant(STATIC_DENSE)
    assert dense.providers == ("cpu",) and dense.kv.growth == "static"
    assert not (q4_1_package / (dense.file + ".data")).exists()
    import onnx

    def stored(file):  # (offset, length) in the data file -> initializer name
        g = onnx.load(str(q4_1_package / file), load_external_data=False).graph
        return {(e["offset"], e["length"]): t.name for t in g.initializer
                if (e := {x.key: x.value for x in t.external_data})}
    portable = stored(manifest.variant("portable").file)
    extra = [name for at, name in stored(dense.file).items() if at not in portable]
    assert extra and all(name.startswith("rope.") for name in extra), extra
    assert STATIC_DENSE in manifest.verification
    report = manifest.verification[STATIC_DENSE]
    assert report.dropped is None and report.greedy.identical_prefix == report.greedy.steps  # the reference's tokens


def test_refused_where_no_layer_is_quantized(tiny_llama, tmp_path):
    from exporters.export import export
    from portable_infer.errors import InvalidArgumentError

    with pytest.raises(InvalidArgumentError, match="static-dense"):
        export(tiny_llama.source, tmp_path / "pkg", precision="fp32", variants=("static", STATIC_DENSE), verify=False)


@pytest.mark.parametrize("which", ["q4_1", "float"])
def test_batched_forwards_run_on_it_and_pick_the_same_tokens(which, q4_1_package, float_int4_package, monkeypatch):
    """With a batch declared, forwards of more than one token run on the companion and single-row
    steps on the exact graph; the greedy tokens of a 3-row batch and of one row are those of the
    engine without it, and the logits agree (the companion's head is the 8-bit table at float
    activations, the static graph's refines its top 16 of an int8-activation pass: within 2 %)."""
    pkg = q4_1_package if which == "q4_1" else float_int4_package
    print("DENSE_SEED", SEED)
    rng = np.random.default_rng(SEED)
    plain, paired = _load(pkg, 1), _load(pkg, 4)
    assert plain.engine.batched is None and paired.engine.batched is not None
    runs = {"exact": 0, "dense": 0}
    for name, session in (("exact", paired.engine.session), ("dense", paired.engine.batched)):
        real = session.run_with_iobinding
        monkeypatch.setattr(session, "run_with_iobinding",
                            lambda *a, _real=real, _name=name, **k: (runs.__setitem__(_name, runs[_name] + 1), _real(*a, **k))[1])
    for rows in (3, 1):
        ids = rng.integers(3, 250, (rows, 6)).astype(np.int64)
        caches = [m.engine.new_cache(rows, 16) for m in (plain, paired)]
        mask = np.ones_like(ids)
        outs = [m.engine.forward(ids, mask, c) for m, c in zip((plain, paired), caches)]
        for _ in range(4):
            np.testing.assert_array_equal(outs[1].argmax(-1), outs[0].argmax(-1))
            scale = float(np.abs(outs[0]).max())
            assert float(np.abs(outs[1] - outs[0]).max()) <= 0.02 * scale
            nxt = outs[0].argmax(-1)[:, None].astype(np.int64)
            mask = np.concatenate([mask, np.ones((rows, 1), np.int64)], axis=1)
            outs = [m.engine.forward(nxt, mask, c) for m, c in zip((plain, paired), caches)]
    # 3 rows: a prefill and 4 steps on the companion; 1 row: its prefill (6 tokens) too, its steps not
    assert runs == {"dense": 1 + 4 + 1, "exact": 4}, runs


def test_attached_only_where_it_serves(q4_1_package, monkeypatch):
    manifest = mf.Manifest.load(q4_1_package)
    static = manifest.variant("static")
    assert dense_companion.companion(manifest, static, "cpu", 16).name == STATIC_DENSE
    assert dense_companion.companion(manifest, static, "cpu", 1) is None  # no batch declared
    assert dense_companion.companion(manifest, static, "cuda", 16) is None
    assert dense_companion.companion(manifest, manifest.variant("static-int8"), "cpu", 16) is None
    monkeypatch.setenv("PORTABLE_INFER_DENSE", "0")
    assert dense_companion.companion(manifest, static, "cpu", 16) is None
    monkeypatch.delenv("PORTABLE_INFER_DENSE")
    model = _load(q4_1_package, 1)  # an engine without it; the memory guard refuses to attach
    need = dense_companion.dense_bytes(manifest.model)
    import onnxruntime as ort

    from portable_infer.engine.session import SessionConfig

    cfg = dense_companion.prepare(manifest, SessionConfig(intra_op_threads=1), 16)
    assert not cfg.spin_between_runs
    assert dense_companion.prepare(manifest, SessionConfig(), 1).spin_between_runs  # no batch: as before
    assert not dense_companion.attach(model.engine, manifest, q4_1_package, cfg, ort, 16, available=2 * need - 1)
    assert model.engine.batched is None
    assert dense_companion.attach(model.engine, manifest, q4_1_package, cfg, ort, 16, available=2 * need)
    assert model.engine.batched is not None


def test_available_memory_reads_meminfo_and_the_cgroup(tmp_path):
    root = tmp_path
    (root / "proc/self").mkdir(parents=True)
    (root / "proc/meminfo").write_text("MemTotal: 16000000 kB\nMemAvailable: 8000000 kB\n")
    (root / "proc/self/cgroup").write_text("0::/app\n")
    assert host.available_memory(root) == 8000000 * 1024
    cg = root / "sys/fs/cgroup/app"
    cg.mkdir(parents=True)
    (cg / "memory.max").write_text(f"{3 << 30}\n")
    (cg / "memory.current").write_text(f"{1 << 30}\n")
    assert host.available_memory(root) == 2 << 30  # the cgroup leaves less than the host
    (cg / "memory.max").write_text("max\n")
    assert host.available_memory(root) == 8000000 * 1024
    assert host.available_memory(tmp_path / "nowhere") is None
