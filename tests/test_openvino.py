"""The portable variant on OpenVINOExecutionProvider (onnxruntime-openvino, OpenVINO's CPU plugin).

onnxruntime-openvino and plain onnxruntime install the same ``onnxruntime`` package and overwrite
each other's files, so the OpenVINO side runs in a virtualenv of its own: ``.venv-openvino`` at the
repository root (``PORTABLE_INFER_OPENVINO_VENV`` moves it), built by :func:`ensure_openvino_venv`
from ``.ci/openvino-requirements.txt`` (the pinned onnxruntime-openvino, numpy, tokenizers, jinja2;
never plain onnxruntime) plus this checkout installed editable with ``--no-deps``. It is reused
while its stamp (requirements, Python, checkout) and a probe of it still hold, else rebuilt; about
15 s with a warm pip cache. Exports run here (they need torch); everything OpenVINO runs in a
subprocess with that venv's python, which prints JSON that is compared with the CPU provider (same
package, same graph variant) and with transformers.

No skip: when onnxruntime-openvino cannot be installed the tests fail and say why. The one exception
is a platform for which PyPI has no onnxruntime-openvino wheel at all (it publishes Linux x86_64
and Windows x86-64 ones): there they skip, saying so. README's test command (which ``.ci/run`` runs)
collects these tests, so CI builds the venv and runs them on every submission;
:func:`test_ci_runs_the_openvino_tests` keeps it that way.

Prompts come from a fresh random seed each run, printed in every assertion message; rerun one
with ``RUNTIME_SEED=<seed> pytest tests/test_openvino.py``.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import os
import platform
import random
import shlex
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from _decode import greedy_steps

pytestmark = pytest.mark.openvino

REPO = Path(__file__).resolve().parents[1]
REQUIREMENTS = REPO / ".ci" / "openvino-requirements.txt"
VENV = Path(os.environ.get("PORTABLE_INFER_OPENVINO_VENV") or REPO / ".venv-openvino")
STAMP = "portable-infer-openvino.json"
OV = "OpenVINOExecutionProvider"

# (platform.system(), platform.machine()) where PyPI has onnxruntime-openvino wheels (1.24.1: cp310-cp313)
WHEEL_PLATFORMS = {("Linux", "x86_64"), ("Windows", "AMD64")}

SEED = int(os.environ.get("RUNTIME_SEED") or random.SystemRandom().randrange(2**31))
TAG = f"[RUNTIME_SEED={SEED}]"
STEPS = 20
# OpenVINO's CPU plugin vs ONNX Runtime's CPU provider, fp32 (and int8/int4 with precision=ACCURACY),
# tiny llama (|logits| up to ~3): max |diff| of last-position logits measured 2.7e-6 over 30 random
# prompts x 20 greedy steps per package (fp32, int8, int4), onnxruntime-openvino 1.24.1 on a 2-core
# AMD EPYC (AVX-512). Both run fp32 math and differ only in summation order; 1e-4 is the runtime
# tests' own tolerance, ~35x above what was measured. The CPU provider's static graph (GroupQueryAttention)
# vs its portable one, the reference of the default-load test: 2.2e-6 over 30 prompts x 20 steps, no parting.
LOGIT_TOL = 1e-4
# int8/int4 weights with OpenVINO's default CPU settings: it quantizes activations to int8 on the fly
# (dynamic quantization, groups of 32) for MatMuls with compressed weights. Measured max |diff|
# 7.3e-2 (int8) and 7.0e-2 (int4) over the same 30 prompts; greedy sequences then part at near-ties
# (16/30 identical for int8, 21/30 for int4, CPU's top-2 margin <= 0.026 at every parting).
DYNAMIC_QUANT_TOL = 0.2
ACCURACY = {"openvino": {"precision": "ACCURACY"}}  # OpenVINO keeps the graph's precision: no dynamic quantization


# --- the OpenVINO virtualenv ------------------------------------------------------------------
class OpenVinoVenvError(RuntimeError):
    """The OpenVINO virtualenv could not be built or does not work."""


PROBE = textwrap.dedent("""
    import importlib.util, json
    import onnxruntime as ort
    import portable_infer
    from portable_infer.engine.providers import installed_builds
    print(json.dumps({"ort_version": ort.__version__, "providers": ort.get_available_providers(),
                      "builds": installed_builds(), "portable_infer": portable_infer.__file__,
                      "torch": importlib.util.find_spec("torch") is not None}))
""")


def _python(venv: Path) -> Path:
    return venv / ("Scripts/python.exe" if sys.platform == "win32" else "bin/python")


def _pinned_version() -> str:
    for line in REQUIREMENTS.read_text().splitlines():
        if line.strip().startswith("onnxruntime-openvino=="):
            return line.split("==", 1)[1].strip()
    raise OpenVinoVenvError(f"{REQUIREMENTS} does not pin onnxruntime-openvino==VERSION")


def _stamp() -> dict:
    return {"requirements_sha256": hashlib.sha256(REQUIREMENTS.read_bytes()).hexdigest(),
            "python": sys.version, "checkout": str(REPO)}


def probe(python: Path) -> dict:
    """What the venv's onnxruntime is; raises :class:`OpenVinoVenvError` when it is not usable."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([str(python), "-c", PROBE], capture_output=True, text=True, env=env, timeout=300)
    if r.returncode != 0:
        raise OpenVinoVenvError(f"{python} cannot import onnxruntime and portable_infer:\n{r.stderr[-2000:]}")
    info = json.loads(r.stdout.strip().splitlines()[-1])
    want = _pinned_version()
    problems = []
    if OV not in info["providers"]:
        problems.append(f"{OV} is not available (providers: {info['providers']})")
    if [list(b) for b in info["builds"]] != [["onnxruntime-openvino", want]]:
        problems.append(f"ONNX Runtime builds installed: {info['builds']}, want only onnxruntime-openvino {want}")
    if not Path(info["portable_infer"]).resolve().is_relative_to(REPO):
        problems.append(f"portable_infer comes from {info['portable_infer']}, not this checkout {REPO}")
    if problems:
        raise OpenVinoVenvError(f"{python}: " + "; ".join(problems))
    return info


def _pip(python: Path, *args: str) -> None:
    wheelhouse = os.environ.get("PORTABLE_INFER_WHEELHOUSE")  # offline: a folder of wheels
    offline = ["--no-index", "--find-links", wheelhouse] if wheelhouse else []
    cmd = [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", *offline, *args]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
    if r.returncode != 0:
        raise OpenVinoVenvError(f"`{' '.join(cmd)}` failed (exit {r.returncode}); onnxruntime-openvino "
                                f"{_pinned_version()} needs a wheel for this Python ({sys.version.split()[0]}) and "
                                f"platform, from PyPI or PORTABLE_INFER_WHEELHOUSE:\n{(r.stdout + r.stderr)[-3000:]}")


@contextlib.contextmanager
def _lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        try:
            import fcntl
        except ImportError:  # Windows: no lock
            yield
            return
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def ensure_openvino_venv(venv: Path = VENV) -> tuple[Path, dict]:
    """(python, probe) of the OpenVINO virtualenv, reused when valid, else (re)built.

    Raises :class:`OpenVinoVenvError` with pip's output when it cannot be built.
    """
    python = _python(venv)
    with _lock(venv.with_name(venv.name + ".lock")):
        stamp = venv / STAMP
        if stamp.is_file() and python.exists():
            try:
                if json.loads(stamp.read_text()) == _stamp():
                    return python, probe(python)
            except (OpenVinoVenvError, ValueError, subprocess.TimeoutExpired):
                pass  # stale or broken: rebuild
        shutil.rmtree(venv, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
        _pip(python, "--only-binary", ":all:", "-r", str(REQUIREMENTS))  # never plain onnxruntime
        _pip(python, "--no-deps", "-e", str(REPO))  # this checkout, without pyproject's onnxruntime
        info = probe(python)
        stamp.write_text(json.dumps(_stamp(), indent=2))
        return python, info


# --- running on OpenVINO ---------------------------------------------------------------------
# Runs in the OpenVINO venv: job JSON in (argv[1]), result JSON out (argv[2]).
SCRIPT = textwrap.dedent("""
    import json, sys
    import numpy as np
    import onnxruntime as ort
    import portable_infer

    {greedy_steps}

    job = json.load(open(sys.argv[1]))
    opts = job["provider_options"]
    model = portable_infer.load(job["package"], providers=job["providers"], strict=job["strict"],
                                intra_op_threads=2, provider_options=opts)
    # ORT silently gives single nodes OpenVINO cannot take to the CPU provider: the same graph and
    # options with that fallback forbidden must still make a session.
    so = ort.SessionOptions()
    so.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    ov_opts = {{**model.selection.provider.default_options, **(opts or {{}}).get("openvino", {{}})}}
    try:
        ort.InferenceSession(str(model.path / model.selection.variant.file), so,
                             providers=[("OpenVINOExecutionProvider", ov_opts)])
        cpu_nodes = None
    except Exception as exc:
        cpu_nodes = f"{{type(exc).__name__}}: {{exc}}"
    rows = []
    for ids, forced in zip(job["prompts"], job["forced"]):
        tokens, logits = greedy_steps(model, ids, job["steps"])
        api = model.generate_ids(ids, max_new_tokens=job["steps"], temperature=0.0, ignore_eos=True)
        teacher = model.forward_logits(forced[:-1])[len(ids) - 1:]  # along the CPU's greedy sequence
        rows.append({{"tokens": tokens, "generate_ids": api, "logits": logits.tolist(),
                      "teacher_forced": teacher.tolist()}})
    json.dump({{"provider": model.provider, "variant": model.variant, "precision": model.manifest.precision,
                "session_providers": model.selection.session.get_providers(),
                "skipped": [list(s) for s in model.selection.skipped],
                "ort_version": ort.__version__, "cpu_nodes": cpu_nodes, "rows": rows}}, open(sys.argv[2], "w"))
""").format(greedy_steps=inspect.getsource(greedy_steps))


@pytest.fixture(scope="session")
def openvino_venv() -> tuple[Path, dict]:
    where = (platform.system(), platform.machine())
    if where not in WHEEL_PLATFORMS:
        pytest.skip(f"PyPI has no onnxruntime-openvino wheel for {where[0]} {where[1]} (only for "
                    f"{sorted(WHEEL_PLATFORMS)}): the OpenVINO tests cannot run on this platform")
    try:
        return ensure_openvino_venv()
    except OpenVinoVenvError as exc:
        pytest.fail(f"the OpenVINO virtualenv ({VENV}) could not be built: {exc}", pytrace=False)


def run_on_openvino(python: Path, package: Path, prompts: list, forced: list, tmp_path: Path,
                    provider_options: dict | None = None, providers: str = "openvino", strict: bool = True) -> dict:
    """Load ``package`` in the OpenVINO venv with ``providers``; it must run on OpenVINO, every node."""
    job, out = tmp_path / "job.json", tmp_path / "out.json"
    job.write_text(json.dumps({"package": str(package), "prompts": prompts, "forced": forced, "steps": STEPS,
                               "provider_options": provider_options, "providers": providers, "strict": strict}))
    env = {**{k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
           "PORTABLE_INFER_HOME": str(tmp_path / "home")}
    r = subprocess.run([str(python), "-c", SCRIPT, str(job), str(out)], capture_output=True, text=True,
                       env=env, cwd=tmp_path, timeout=600)
    assert r.returncode == 0, f"{TAG} OpenVINO side failed:\n{r.stderr[-4000:]}"
    res = json.loads(out.read_text())
    assert res["provider"] == OV, f"{TAG} ran on {res['provider']} (skipped: {res['skipped']})"
    assert res["session_providers"][0] == OV, f"{TAG} the session runs on {res['session_providers']}"
    assert res["variant"] == "portable", res["variant"]
    assert res["cpu_nodes"] is None, f"{TAG} some nodes of the graph run on the CPU provider: {res['cpu_nodes']}"
    return res


@pytest.fixture
def rng(request):
    return np.random.default_rng([SEED, sum(map(ord, request.node.name))])


def prompts_of(rng) -> list:
    lengths = (1, int(rng.integers(2, 16)), int(rng.integers(16, 64)))
    return [rng.integers(3, 256, n).tolist() for n in lengths]  # never 0 (pad), 1 (bos) or 2 (eos)


def cpu_reference(model, prompts) -> list:
    return [greedy_steps(model, ids, STEPS) for ids in prompts]


def check_exact(res: dict, ref: list, prompts: list, what: str) -> list:
    """Greedy tokens identical and logits within LOGIT_TOL; returns the max |diff| per prompt."""
    diffs = []
    for ids, row, (tokens, logits) in zip(prompts, res["rows"], ref):
        ov_logits = np.asarray(row["logits"], np.float32)
        k = next((i for i, (a, b) in enumerate(zip(row["tokens"], tokens)) if a != b), STEPS)
        if k < STEPS:  # only a tie within the tolerance may part them: both are greedy choices
            margin = float(logits[k, tokens[k]] - logits[k, row["tokens"][k]])
            assert margin <= 2 * LOGIT_TOL, (
                f"{TAG} {what}, prompt {ids}: OpenVINO chose {row['tokens'][k]} at step {k}, the CPU provider "
                f"{tokens[k]} ({margin:.3g} above it)\nOpenVINO {row['tokens']}\nCPU      {tokens}")
        diff = float(np.abs(ov_logits[:k + 1] - logits[:k + 1]).max())
        forced = float(np.abs(np.asarray(row["teacher_forced"], np.float32) - logits).max())
        assert diff <= LOGIT_TOL and forced <= LOGIT_TOL, (
            f"{TAG} {what}, prompt {ids}: logits differ from the CPU provider's by {diff:.2e} (cached decode) "
            f"and {forced:.2e} (teacher forced), tolerance {LOGIT_TOL}")
        assert row["generate_ids"] == row["tokens"], f"{TAG} {what}: generate_ids differs from the engine's greedy"
        diffs.append(max(diff, forced))
    return diffs


# --- tests ------------------------------------------------------------------------------------
def test_openvino_venv_holds_only_the_openvino_build(openvino_venv):
    python, info = openvino_venv
    assert info["ort_version"] == _pinned_version()
    assert OV in info["providers"] and "CPUExecutionProvider" in info["providers"]
    assert info["builds"] == [["onnxruntime-openvino", _pinned_version()]]  # no plain onnxruntime
    assert not info["torch"]  # the runtime side only


def test_fp32_greedy_parity_with_cpu_and_transformers(openvino_venv, tiny_llama, load_variant, rng, tmp_path):
    """tiny_llama's package has the portable and the fused variant: OpenVINO takes the portable one
    (the fused one's com.microsoft ops would run on the CPU provider) and matches the CPU provider on
    the same graph, token for token and within LOGIT_TOL, and transformers' greedy."""
    torch = pytest.importorskip("torch")
    prompts = prompts_of(rng)
    ref = cpu_reference(load_variant(tiny_llama.package, "portable"), prompts)
    res = run_on_openvino(openvino_venv[0], tiny_llama.package, prompts,
                          [ids + tokens for ids, (tokens, _) in zip(prompts, ref)], tmp_path)
    assert res["precision"] == "fp32"
    check_exact(res, ref, prompts, "fp32")
    for ids, row in zip(prompts, res["rows"]):  # transformers, teacher forced on OpenVINO's tokens
        ours = row["tokens"]
        with torch.no_grad():
            logits = tiny_llama.model(torch.tensor([ids + ours])).logits[0, len(ids) - 1:-1].numpy()
        gap = logits.max(-1) - logits[np.arange(STEPS), ours]
        assert gap.max() <= 1e-4, f"{TAG} prompt {ids}: step {int(gap.argmax())} is {gap.max():.3g} below transformers' best"


@pytest.mark.parametrize("providers", ["auto", "openvino"])
def test_default_load_runs_on_openvino_with_the_cpus_greedy_tokens(openvino_venv, tiny_llama, rng, tmp_path,
                                                                  providers):
    """Issue 16's regression: the package has static, fused and portable graphs, and a plain
    ``load(pkg, providers)`` (no strict) skipped OpenVINO because the static-KV default had narrowed
    the pool to the static graph, then ran on the CPU. OpenVINO must take its portable graph and
    match the greedy tokens of the CPU provider's default load (the static graph) of the same package."""
    import portable_infer
    from portable_infer.package.manifest import Manifest

    names = [v.name for v in Manifest.load(tiny_llama.package).variants]
    assert {"static", "fused", "portable"} <= set(names), names
    cpu = portable_infer.load(tiny_llama.package, intra_op_threads=2)  # plain onnxruntime: the CPU's default
    assert (cpu.provider, cpu.variant) == ("CPUExecutionProvider", "static")
    prompts = prompts_of(rng)
    ref = cpu_reference(cpu, prompts)
    res = run_on_openvino(openvino_venv[0], tiny_llama.package, prompts,
                          [ids + tokens for ids, (tokens, _) in zip(prompts, ref)], tmp_path,
                          providers=providers, strict=False)
    assert res["skipped"] == [], f"{TAG} providers={providers!r}: {res['skipped']}"
    check_exact(res, ref, prompts, f"providers={providers!r}")


def test_ci_runs_the_openvino_tests():
    """.ci/run runs README's test command, and that command collects this file: no marker, keyword
    or path filter leaves the OpenVINO tests out, neither there nor in pyproject's pytest options."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    block = readme.split("Set up and run the tests", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    command = [ln for ln in block.strip().splitlines() if ln.strip()]
    assert len(command) == 1, f"README's test command must be one line, got {command}"
    ci = [ln for ln in (REPO / ".ci" / "run").read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    assert command[0] in ci, f".ci/run must run README's test command {command[0]!r}; it runs {ci}"
    pytest_args = shlex.split(command[0].split("-m pytest", 1)[1].split("&&", 1)[0])
    leaves_out = [a for a in pytest_args if a.split("=")[0] in ("-m", "-k", "--deselect", "--ignore", "--ignore-glob")
                  or not a.startswith("-")]
    assert not leaves_out, f"README's pytest call filters tests: {leaves_out}"
    import tomllib

    options = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    assert "openvino" not in str(options.get("addopts", "")) and options["testpaths"] == ["tests"]


@pytest.fixture(scope="module")
def quantized(tiny_llama, tmp_path_factory) -> dict:
    """tiny_llama exported int8 and int4, portable variant only (blocked DequantizeLinear, opset 21)."""
    from exporters.export import export

    root = tmp_path_factory.mktemp("tiny_quantized")
    return {p: export(tiny_llama.source, root / p, precision=p, variants=("portable",), verify=False)
            for p in ("int8", "int4")}


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_quantized_portable_is_exact_with_accuracy_precision(openvino_venv, quantized, precision, rng, tmp_path):
    """OpenVINO runs the blocked DequantizeLinear graphs entirely itself; with precision=ACCURACY it
    matches the CPU provider exactly (greedy tokens, logits within LOGIT_TOL)."""
    import portable_infer

    prompts = prompts_of(rng)
    ref = cpu_reference(portable_infer.load(quantized[precision], "cpu", intra_op_threads=2), prompts)
    res = run_on_openvino(openvino_venv[0], quantized[precision], prompts,
                          [ids + tokens for ids, (tokens, _) in zip(prompts, ref)], tmp_path, ACCURACY)
    assert res["precision"] == precision
    check_exact(res, ref, prompts, f"{precision} precision=ACCURACY")


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_quantized_portable_default_settings_within_dynamic_quantization(openvino_venv, quantized, precision, rng,
                                                                        tmp_path):
    """With the provider table's defaults OpenVINO quantizes activations of int8/int4 MatMuls to int8:
    not greedy parity (see DYNAMIC_QUANT_TOL), but the logits stay within DYNAMIC_QUANT_TOL."""
    import portable_infer

    prompts = prompts_of(rng)
    ref = cpu_reference(portable_infer.load(quantized[precision], "cpu", intra_op_threads=2), prompts)
    res = run_on_openvino(openvino_venv[0], quantized[precision], prompts,
                          [ids + tokens for ids, (tokens, _) in zip(prompts, ref)], tmp_path)
    for ids, row, (tokens, logits) in zip(prompts, res["rows"], ref):
        forced = float(np.abs(np.asarray(row["teacher_forced"], np.float32) - logits).max())
        assert forced <= DYNAMIC_QUANT_TOL, (f"{TAG} {precision}, prompt {ids}: logits differ from the CPU "
                                             f"provider's by {forced:.3g} (teacher forced), tolerance {DYNAMIC_QUANT_TOL}")
        assert row["generate_ids"] == row["tokens"], TAG
