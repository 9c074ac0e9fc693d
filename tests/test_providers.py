"""Provider table, resolution, selection with fallback and doctor, against a fake onnxruntime."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from portable_infer.engine import providers
from portable_infer.errors import InvalidArgumentError, PackageError, ProviderError
from portable_infer.package.manifest import GraphVariant, KVLayout
from portable_infer.engine.doctor import doctor_report, format_doctor
from portable_infer.engine.provider_spec import ProviderSpec
from portable_infer.engine.providers import (
    ENV_VAR, PROVIDERS, build_conflict_warning, installed_builds, resolve, select_session,
)
from portable_infer.engine.variant_choice import pick_variant

CUDA, CPU_EP = "CUDAExecutionProvider", "CPUExecutionProvider"


class FakeSession:
    def __init__(self, providers):
        self._providers = providers

    def get_providers(self):
        return list(self._providers)


class FakeOrt:
    """The few onnxruntime names select_session uses. ``fail``: providers whose session creation
    raises; ``ignored``: providers ORT lists but silently replaces by CPU."""

    class SessionOptions:
        pass

    def __init__(self, available, version="1.31.1", fail=(), ignored=()):
        self.__version__ = version
        self.available, self.fail, self.ignored = list(available), set(fail), set(ignored)
        self.created = []  # (path, providers) per InferenceSession call

    def get_available_providers(self):
        return list(self.available)

    def InferenceSession(self, path, sess_options, providers):
        self.created.append((path, providers))
        name = providers[0][0]
        if name in self.fail:
            raise RuntimeError("libcudnn.so.9: cannot open shared object file")
        return FakeSession([CPU_EP] if name in self.ignored else [p for p, _ in providers])


def variant(name, precision="fp32", providers=("*",)):
    kv = KVLayout("BHSD", "float32", 1, 4, "static" if name.startswith("static") else "concat", (), ())
    return GraphVariant(name=name, file=f"model.{name}.{precision}.onnx", precision=precision, opset=17,
                        domains=("com.microsoft",) if name == "fused" else (), providers=providers,
                        inputs=(), outputs=(), kv=kv)


@pytest.fixture(autouse=True)
def no_env(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)


@pytest.fixture
def package(tmp_path):
    """(variants, dir): a fused and a portable fp32 variant, files present."""
    variants = (variant("fused"), variant("portable"))
    for v in variants:
        (tmp_path / v.file).write_bytes(b"")
    return variants, tmp_path


def keys(specs):
    return [s.key for s in specs]


# --- table and resolve ---------------------------------------------------------------------------
def test_table_is_consistent():
    assert len({s.key for s in PROVIDERS}) == len(PROVIDERS)
    assert all(isinstance(s, ProviderSpec) and s.variants and s.precisions for s in PROVIDERS)
    assert keys(PROVIDERS)[-1] == "cpu" and PROVIDERS[-1].priority == max(s.priority for s in PROVIDERS)
    with pytest.raises(TypeError):  # the table's defaults cannot be changed by accident
        PROVIDERS[0].default_options["device_id"] = 1


def test_auto_prefers_cuda_and_leaves_tensorrt_out():
    auto = keys(resolve("auto", "1.31.1"))
    assert auto[0] == "cuda" and auto[-1] == "cpu"
    assert "tensorrt" not in auto and "nvtensorrtrtx" not in auto and "rocm_legacy" not in auto
    assert auto.index("migraphx") < auto.index("dml") < auto.index("coreml") < auto.index("qnn")
    assert auto.index("qnn") < auto.index("openvino") < auto.index("webgpu")


@pytest.mark.parametrize("name", ["amd", "rocm", "AMD", "MIGraphXExecutionProvider"])
def test_amd_resolves_to_migraphx_on_new_ort(name):
    assert keys(resolve(name, "1.31.1")) == ["migraphx"]


@pytest.mark.parametrize("name", ["amd", "rocm"])
def test_amd_resolves_to_rocm_then_migraphx_on_old_ort(name):
    assert keys(resolve(name, "1.22.1")) == ["rocm_legacy", "migraphx"]
    assert "rocm_legacy" in keys(resolve("auto", "1.22.0"))


def test_removed_provider_named_explicitly_says_so():
    with pytest.raises(ProviderError, match="removed in ONNX Runtime 1.23"):
        resolve("ROCMExecutionProvider", "1.23.0")


def test_names_lists_and_dedup():
    assert keys(resolve("CUDAExecutionProvider, cpu", "1.31.1")) == ["cuda", "cpu"]
    assert keys(resolve(["directml", "dml", "CPU"], "1.31.1")) == ["dml", "cpu"]
    assert keys(resolve("tensorrt,cuda", "1.31.1")) == ["tensorrt", "cuda"]


def test_unknown_provider_lists_known_names():
    with pytest.raises(ProviderError) as err:
        resolve("cdua", "1.31.1")
    msg = str(err.value)
    assert "'cdua'" in msg and all(k in msg for k in ("auto", "cuda", "openvino", "migraphx", "cpu"))


@pytest.mark.parametrize("bad", ["", " , ", [], ["cuda", 3], "auto,cuda"])
def test_malformed_requests(bad):
    with pytest.raises(InvalidArgumentError):
        resolve(bad, "1.31.1")


def test_env_var_replaces_auto_but_not_an_explicit_choice(monkeypatch):
    monkeypatch.setenv(ENV_VAR, "openvino,cpu")
    assert keys(resolve("auto", "1.31.1")) == ["openvino", "cpu"]
    assert keys(resolve("cuda", "1.31.1")) == ["cuda"]
    monkeypatch.setenv(ENV_VAR, "nonsense")
    with pytest.raises(ProviderError, match=ENV_VAR):
        resolve("auto", "1.31.1")


# --- variant choice ------------------------------------------------------------------------------
def spec(key):
    return next(s for s in PROVIDERS if s.key == key)


def test_variant_preferences():
    fused, portable = variant("fused"), variant("portable")
    assert pick_variant(spec("cuda"), [portable, fused]) is fused
    assert pick_variant(spec("cuda"), [portable]) is portable
    assert pick_variant(spec("openvino"), [fused, portable]) is portable
    assert pick_variant(spec("openvino"), [fused]) is None
    p16, p32, p4, p8 = (variant("portable", p) for p in ("fp16", "fp32", "int4", "int8"))
    assert pick_variant(spec("cuda"), [p32, p8, p16]) is p16
    assert pick_variant(spec("cpu"), [p16, p32, p4]) is p4
    assert pick_variant(spec("openvino"), [p4, p8]) is p8
    assert pick_variant(spec("cpu"), [variant("portable", "q9_9")]) is None


def test_variant_targeting_is_respected():
    only_cuda = variant("fused", providers=("CUDAExecutionProvider",))
    assert pick_variant(spec("cuda"), [only_cuda]) is only_cuda
    assert pick_variant(spec("cpu"), [only_cuda]) is None


# --- select_session ------------------------------------------------------------------------------
def test_auto_picks_cuda_with_fused_variant_and_its_options(package):
    variants, root = package
    ort = FakeOrt([CUDA, CPU_EP])
    sel = select_session(variants, root, ort=ort, provider_options={"nvidia": {"device_id": 1}})
    assert (sel.provider.key, sel.variant.name, sel.skipped) == ("cuda", "fused", ())
    path, eps = ort.created[0]
    assert path == str(root / "model.fused.fp32.onnx")
    assert eps == [(CUDA, {"device_id": 1, "arena_extend_strategy": "kSameAsRequested",
                           "cudnn_conv_algo_search": "HEURISTIC", "use_tf32": 0}), (CPU_EP, {})]


def test_cuda_portable_when_no_fused(tmp_path):
    v = variant("portable", "fp16")
    (tmp_path / v.file).write_bytes(b"")
    sel = select_session([v], tmp_path, ort=FakeOrt([CUDA, CPU_EP]))
    assert (sel.provider.key, sel.variant) == ("cuda", v)


@pytest.mark.parametrize("mode", ["raises", "silently ignored"])
def test_broken_cuda_falls_back_to_cpu_with_warning(package, caplog, mode):
    variants, root = package
    ort = FakeOrt([CUDA, CPU_EP], **({"fail": [CUDA]} if mode == "raises" else {"ignored": [CUDA]}))
    with caplog.at_level(logging.WARNING, logger="portable_infer.engine.providers"):
        sel = select_session(variants, root, ort=ort)
    assert sel.provider.key == "cpu" and sel.session.get_providers() == [CPU_EP]
    assert [k for k, _ in sel.skipped] == ["cuda"]
    reason = sel.skipped[0][1]
    assert reason.startswith("failed:")
    expected = "libcudnn.so.9" if mode == "raises" else "fell back to CPUExecutionProvider"
    assert expected in reason
    assert any("cuda" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)


@pytest.mark.parametrize("fail", [{"fail": [CUDA]}, {"ignored": [CUDA]}])
def test_broken_cuda_strict_raises_with_install_hint(package, fail):
    variants, root = package
    with pytest.raises(ProviderError) as err:
        select_session(variants, root, strict=True, ort=FakeOrt([CUDA, CPU_EP], **fail))
    msg = str(err.value)
    assert "CUDAExecutionProvider" in msg and 'pip install onnxruntime-gpu' in msg
    assert "LD_LIBRARY_PATH" in msg


def test_env_var_makes_auto_pick_cpu(package, monkeypatch):
    variants, root = package
    monkeypatch.setenv(ENV_VAR, "cpu")
    ort = FakeOrt([CUDA, CPU_EP])
    sel = select_session(variants, root, ort=ort)
    assert sel.provider.key == "cpu" and [eps[0][0] for _, eps in ort.created] == [CPU_EP]
    assert ort.created[0][1] == [(CPU_EP, {})]  # no second CPU entry


def test_explicit_cuda_on_cpu_only_build(package, caplog):
    variants, root = package
    with pytest.raises(ProviderError, match=r"not in this ONNX Runtime build.*onnxruntime-gpu"):
        select_session(variants, root, "cuda", strict=True, ort=FakeOrt([CPU_EP]))
    with caplog.at_level(logging.WARNING, logger="portable_infer.engine.providers"):
        sel = select_session(variants, root, "cuda", ort=FakeOrt([CPU_EP]))
    assert sel.provider.key == "cpu"
    assert sel.skipped == (("cuda", "not available: not in this ONNX Runtime build"),)
    assert any("falling back to CPU" in r.getMessage() for r in caplog.records)


def test_rocm_on_old_ort_tries_rocm_then_migraphx(package):
    variants, root = package
    ort = FakeOrt(["ROCMExecutionProvider", "MIGraphXExecutionProvider", CPU_EP], version="1.22.0",
                  fail=["ROCMExecutionProvider"])
    sel = select_session(variants, root, "rocm", ort=ort)
    assert sel.provider.key == "migraphx" and sel.variant.name == "portable"
    assert [eps[0][0] for _, eps in ort.created] == ["ROCMExecutionProvider", "MIGraphXExecutionProvider"]


def test_tensorrt_is_explicit_and_keeps_cuda_for_the_rest(package):
    variants, root = package
    ort = FakeOrt(["TensorrtExecutionProvider", CUDA, CPU_EP])
    assert select_session(variants, root, ort=ort).provider.key == "cuda"
    sel = select_session(variants, root, "trt", ort=ort)
    assert (sel.provider.key, sel.variant.name) == ("tensorrt", "portable")
    assert [name for name, _ in ort.created[-1][1]] == ["TensorrtExecutionProvider", CUDA, CPU_EP]


def test_openvino_gets_portable_even_when_fused_exists(package):
    variants, root = package
    sel = select_session(variants, root, ort=FakeOrt(["OpenVINOExecutionProvider", CPU_EP]))
    assert (sel.provider.key, sel.variant.name) == ("openvino", "portable")


def test_provider_without_acceptable_variant_is_skipped(tmp_path):
    fused = variant("fused")
    (tmp_path / fused.file).write_bytes(b"")
    ort = FakeOrt(["OpenVINOExecutionProvider", CPU_EP])
    sel = select_session([fused], tmp_path, ort=ort)
    assert sel.provider.key == "cpu" and sel.variant is fused
    assert sel.skipped[0][0] == "openvino" and sel.skipped[0][1].startswith("no suitable variant")
    with pytest.raises(ProviderError, match="no suitable variant"):
        select_session([fused], tmp_path, "openvino", strict=True, ort=ort)


def test_strict_errors_name_the_provider_and_the_reason(tmp_path):
    fused = variant("fused")
    (tmp_path / fused.file).write_bytes(b"")
    with pytest.raises(ProviderError) as err:
        select_session([fused], tmp_path, "openvino", strict=True, ort=FakeOrt(["OpenVINOExecutionProvider", CPU_EP]))
    assert (err.value.provider, err.value.reason) == ("openvino", "no suitable variant")
    with pytest.raises(ProviderError) as err:
        select_session([fused], tmp_path, "cuda", strict=True, ort=FakeOrt([CUDA, CPU_EP], fail=[CUDA]))
    assert (err.value.provider, err.value.reason) == ("cuda", "failed")
    with pytest.raises(ProviderError) as err:
        select_session([fused], tmp_path, "cuda", strict=True, ort=FakeOrt([CPU_EP]))
    assert (err.value.provider, err.value.reason) == ("cuda", "not available")


def test_nothing_works_raises_with_every_reason(package):
    variants, root = package
    with pytest.raises(ProviderError, match=r"cuda: failed.*cpu: failed"):
        select_session(variants, root, ort=FakeOrt([CUDA, CPU_EP], fail=[CUDA, CPU_EP]))


def test_missing_variant_file_is_a_package_error(tmp_path):
    with pytest.raises(PackageError, match="missing"):
        select_session([variant("portable")], tmp_path, ort=FakeOrt([CPU_EP]))


def test_bad_provider_options(package):
    variants, root = package
    with pytest.raises(InvalidArgumentError, match="provider_options"):
        select_session(variants, root, ort=FakeOrt([CPU_EP]), provider_options={"cpu": 3})
    with pytest.raises(ProviderError, match="unknown execution provider 'gpu0'"):
        select_session(variants, root, ort=FakeOrt([CPU_EP]), provider_options={"gpu0": {}})


# --- builds and doctor ---------------------------------------------------------------------------
def test_installed_builds_and_conflict(monkeypatch):
    fake = {"onnxruntime": "1.31.1", "onnxruntime-gpu": "1.31.0"}

    def version(dist):
        if dist not in fake:
            raise providers.metadata.PackageNotFoundError(dist)
        return fake[dist]

    monkeypatch.setattr(providers.metadata, "version", version)
    builds = installed_builds()
    assert builds == [("onnxruntime", "1.31.1"), ("onnxruntime-gpu", "1.31.0")]
    msg = build_conflict_warning(builds)
    assert "onnxruntime-gpu 1.31.0" in msg and "pip uninstall -y onnxruntime onnxruntime-gpu" in msg
    assert "one build per virtualenv" in msg
    assert build_conflict_warning(builds[:1]) is None and build_conflict_warning([]) is None


def test_doctor_report(monkeypatch):
    monkeypatch.setattr(providers, "installed_builds", lambda: [("onnxruntime-gpu", "1.31.1")])
    ort = FakeOrt([CUDA, "TensorrtExecutionProvider", "AzureExecutionProvider", CPU_EP])
    report = doctor_report(ort, variants=[variant("portable", "fp16")])
    assert report["auto"]["provider"] == "cuda" and report["auto"]["variant"] == "portable"
    rows = {r["key"]: r for r in report["providers"]}
    assert rows["cuda"]["status"] == "picked" and rows["cpu"]["status"] == "fallback"
    assert rows["rocm_legacy"]["reason"] == "removed in ONNX Runtime 1.23"
    assert rows["openvino"]["reason"] == "not in this ONNX Runtime build"
    assert "ask for it explicitly" in rows["tensorrt"]["reason"]
    assert report["unused_available"] == ["AzureExecutionProvider"] and report["build_conflict"] is None
    text = format_doctor(report)
    assert "auto picks: cuda" in text and "onnxruntime-gpu 1.31.1" in text
    assert 'pip install onnxruntime-openvino' in text


def test_doctor_reports_each_providers_own_variant(monkeypatch):
    """doctor uses the loader's rule: with a static graph in the package OpenVINO still has portable."""
    monkeypatch.setattr(providers, "installed_builds", lambda: [("onnxruntime-openvino", "1.24.1")])
    ort = FakeOrt(["OpenVINOExecutionProvider", CPU_EP])
    report = doctor_report(ort, variants=[variant(n) for n in ("portable", "fused", "static")])
    assert report["auto"] == {"provider": "openvino", "ort_name": "OpenVINOExecutionProvider",
                              "device": spec("openvino").device, "variant": "portable"}
    report = doctor_report(ort, variants=[variant("fused"), variant("static")])
    rows = {r["key"]: r for r in report["providers"]}
    assert report["auto"]["provider"] == "cpu" and report["auto"]["variant"] == "static"
    assert rows["openvino"]["reason"].startswith("no suitable variant: it takes portable")


def test_doctor_with_env_override(monkeypatch):
    monkeypatch.setenv(ENV_VAR, "openvino")
    report = doctor_report(FakeOrt([CUDA, CPU_EP]))
    rows = {r["key"]: r for r in report["providers"]}
    assert report["auto"]["provider"] == "cpu"  # what select_session falls back to
    assert rows["cuda"]["reason"] == f"not in {ENV_VAR}"
    assert f"{ENV_VAR}=openvino" in format_doctor(report)


# --- the real onnxruntime CPU build ----------------------------------------------------------------
def test_real_onnxruntime_cpu(tmp_path):
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])
    z = helper.make_tensor_value_info("z", TensorProto.FLOAT, [2])
    graph = helper.make_graph([helper.make_node("Add", ["x", "y"], ["z"])], "add", [x, y], [z])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(tmp_path / "model.onnx"))
    kv = KVLayout("BHSD", "float32", 1, 1, "concat", (), ())
    v = GraphVariant(name="portable", file="model.onnx", precision="fp32", opset=17, domains=(),
                     providers=("*",), inputs=(), outputs=(), kv=kv)

    sel = select_session([v], tmp_path, "auto")
    assert sel.provider.key == "cpu" and sel.session.get_providers()[0] == CPU_EP
    (out,) = sel.session.run(None, {"x": np.array([1, 2], np.float32), "y": np.array([3, 4], np.float32)})
    np.testing.assert_array_equal(out, [4, 6])
