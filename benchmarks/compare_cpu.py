"""portable_infer against the other CPU runtimes: same model, prompts and threads, one run.

Runs the competitor setup (venvs, HF folder, reference, exports; skipped when present), then each
runtime's runner in its own virtualenv and its own subprocess, one after the other, and prints one
markdown table with the speedup of portable_infer over each. The table and every runner's JSON go
to ``benchmarks/results/cpu.json``. The protocol itself is in ``runners/common.py``.

Usage (from the repository root, in the project venv)::

    .venv/bin/python benchmarks/compare_cpu.py [--runs 3] [--only NAME ...] [--skip-setup]
                                               [--package DIR] [--threads 2] [--results FILE]
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import setup_competitors as setup

logger = logging.getLogger("compare_cpu")

HERE = Path(__file__).resolve().parent
RUNNERS = HERE / "runners"
RESULTS = HERE / "results" / "cpu.json"
PROJECT_PYTHON = setup.REPO / ".venv" / "bin" / "python"
DEFAULT_PACKAGE = setup.BENCH / "packages" / "smollm2"
FP32_PACKAGE = setup.BENCH / "packages" / "smollm2-fp32"  # the same GGUF, dequantized
BASELINE = "portable_infer"
RUNNER_TIMEOUT_S = 3600
# A runner uses `threads` cores; a load average well above that means someone else is running.
BUSY_LOADAVG = 2.5


@dataclass(frozen=True)
class Entry:
    """One row of the table: which runner, in which venv, on which model files."""

    runner: str
    venv: str | None  # a setup_competitors venv; None = the project venv
    model: str  # "hf", "gguf", "package" or an export name of setup_competitors.EXPORTS
    extra: tuple[str, ...] = ()


RUNTIMES: dict[str, Entry] = {
    "portable_infer": Entry("portable_infer_runner.py", None, "package"),
    "portable_infer-int8act": Entry("portable_infer_runner.py", None, "package", ("--accuracy", "4")),
    "portable_infer-fp32": Entry("portable_infer_runner.py", None, "package-fp32"),
    "transformers-fp32": Entry("transformers_pt.py", "transformers", "hf"),
    "optimum-ort-fp32": Entry("optimum_ort.py", "optimum", "optimum-fp32"),
    "ortgenai-fp32": Entry("ortgenai.py", "ortgenai", "ortgenai-fp32", ("--precision", "fp32")),
    "ortgenai-int4": Entry("ortgenai.py", "ortgenai", "ortgenai-int4", ("--precision", "int4")),
    "llamacpp-q4_1": Entry("llamacpp.py", "llamacpp", "gguf"),
}

# (header, key, format); speedups are appended after these.
COLUMNS = (
    ("load s", "load_s", "{:.2f}"),
    ("TTFT ms", "ttft_ms", "{:.1f}"),
    ("decode tok/s", "decode_tok_s", "{:.1f}"),
    ("batch-8 tok/s", "batch8_tok_s", "{:.1f}"),
    ("peak RSS MiB", "peak_rss_mib", "{:.0f}"),
    ("size MiB", "size_mib", "{:.1f}"),
)


def model_path(entry: Entry, package: Path) -> Path:
    if entry.model == "package":
        return package
    if entry.model == "package-fp32":
        return FP32_PACKAGE
    if entry.model == "hf":
        return setup.HF_DIR
    if entry.model == "gguf":
        return setup.gguf_path()
    return setup.EXPORTS[entry.model].out


def select(only: list[str] | None) -> list[str]:
    """Runtime names for --only; a prefix such as "ortgenai" selects every row it starts."""
    if not only:
        return list(RUNTIMES)
    chosen = [name for name in RUNTIMES if any(name.startswith(o) for o in only)]
    unmatched = [o for o in only if not any(name.startswith(o) for name in RUNTIMES)]
    if unmatched:
        raise SystemExit(f"--only {unmatched}: no such runtime; choose from {list(RUNTIMES)}")
    return chosen


def ensure_package(package: Path) -> None:
    """Export the default portable_infer package from the same GGUF when it is missing.

    A failed export does not stop the comparison: the portable_infer row reports the error.
    """
    for pkg, precision in ((package, "int4"), (FP32_PACKAGE, "fp32")):
        if (pkg / "manifest.json").is_file():
            logger.info("portable_infer package: %s exists, skipped", pkg)
            continue
        if pkg not in (DEFAULT_PACKAGE, FP32_PACKAGE):
            continue
        logger.info("portable_infer package: exporting the default model (%s) into %s", precision, pkg)
        try:
            setup.run_logged([str(PROJECT_PYTHON), "-m", "portable_infer.cli", "export", "default",
                              "-o", str(pkg), "--precision", precision], f"export-portable_infer-{precision}",
                             env={"PYTHONPATH": str(setup.REPO)})
        except SystemExit as exc:
            logger.warning("portable_infer export failed: %s", str(exc).splitlines()[0])


def run_runner(name: str, runs: int, threads: int, package: Path) -> dict:
    entry = RUNTIMES[name]
    python = PROJECT_PYTHON if entry.venv is None else setup.venv_python(entry.venv)
    cmd = [str(python), str(RUNNERS / entry.runner), "--model", str(model_path(entry, package)),
           "--reference", str(setup.REFERENCE), "--runs", str(runs), "--threads", str(threads),
           *entry.extra]
    # Every library's own thread pools held to the same count; no hub access anywhere.
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "OPENBLAS_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "PYTHONPATH": str(setup.REPO) if entry.venv is None else ""}
    log = setup.LOGS / f"run-{name}.log"
    logger.info("%s: %s", name, " ".join(cmd))
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=RUNNERS,
                              timeout=RUNNER_TIMEOUT_S)
        stdout, stderr, rc = proc.stdout, proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as exc:
        stdout, stderr, rc = exc.stdout or "", f"{exc.stderr or ''}\ntimed out", None
    wall = time.perf_counter() - start
    setup.LOGS.mkdir(parents=True, exist_ok=True)
    log.write_text(stderr if isinstance(stderr, str) else stderr.decode(errors="replace"))
    lines = [ln for ln in (stdout if isinstance(stdout, str) else "").splitlines()
             if ln.startswith("{")]
    if lines:
        result = json.loads(lines[-1])
    else:
        result = {"error": f"runner exited {rc} without a result; see {log}"}
    result.update(runtime=name, wall_s=round(wall, 1))
    logger.info("%s: %s in %.0f s", name, "error" if "error" in result else "ok", wall)
    return result


def speedups(row: dict, base: dict | None) -> tuple[str, str]:
    """portable_infer's speedup over ``row``: >1 means portable_infer is faster."""
    if not base or "error" in base or "error" in row:
        return "n/a", "n/a"
    return (f"{base['decode_tok_s'] / row['decode_tok_s']:.2f}x",
            f"{row['ttft_ms'] / base['ttft_ms']:.2f}x")


def markdown_table(results: list[dict], threads: int, runs: int) -> str:
    base = next((r for r in results if r["runtime"] == BASELINE), None)
    header = ["runtime", *(c[0] for c in COLUMNS), "top-1 agree",
              "PI decode speedup", "PI TTFT speedup"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    errors = []
    for r in results:
        if "error" in r:
            cells = ["error"] + [""] * (len(header) - 2)
            errors.append(f"- {r['runtime']}: {r['error']}")
        else:
            cells = [fmt.format(r[key]) for _, key, fmt in COLUMNS]
            cells.append(f"{r['agreement']}/{r['agreement_of']}")
            cells.extend(speedups(r, base))
        lines.append("| " + " | ".join([r["runtime"], *cells]) + " |")
    lines.append("")
    lines.append(f"SmolLM2-135M-Instruct, 32-token prompt, 128 new tokens, greedy, {threads} "
                 f"threads, median of {runs} runs after a warm-up. PI speedup = portable_infer "
                 "decode tok/s / the runtime's, and the runtime's TTFT / portable_infer's: above "
                 "1x, portable_infer is faster. top-1 agree = teacher-forced argmax equal to the "
                 "fp32 transformers reference's next token.")
    lines += busy_warning(results, "runtime")
    if errors:
        lines += ["", "Errors:", *errors]
    return "\n".join(lines)


def busy_warning(results: list, key: str) -> list:
    """Lines naming the rows during which other work ran (1-min load average above BUSY_LOADAVG)."""
    busy = [f"{r[key]} {r['loadavg'][0]:.1f}->{r['loadavg'][1]:.1f}"
            for r in results if max(r.get("loadavg", [0.0])) > BUSY_LOADAVG]
    if not busy:
        return []
    return ["", f"Warning: other work was running (1-min load average above {BUSY_LOADAVG} "
                f"on {os.cpu_count()} cores, before->after): {', '.join(busy)}. Numbers "
                "taken on a busy machine are not comparable; rerun when it is idle."]


def machine() -> dict:
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "platform": platform.platform()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="timed runs per metric (median)")
    parser.add_argument("--only", nargs="+", metavar="NAME",
                        help=f"runtimes to run (prefixes allowed): {', '.join(RUNTIMES)}")
    parser.add_argument("--skip-setup", action="store_true",
                        help="do not create venvs or exports (they must exist)")
    parser.add_argument("--package", type=Path, default=DEFAULT_PACKAGE,
                        help=f"portable_infer model package (default {DEFAULT_PACKAGE})")
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads for every runtime")
    parser.add_argument("--results", type=Path, default=RESULTS,
                        help="where the JSON goes (default benchmarks/results/cpu.json); point "
                             "partial --only runs elsewhere to keep the full table")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if args.runs < 1:
        parser.error(f"--runs must be >= 1, got {args.runs}")
    names = select(args.only)
    args.package = args.package.resolve()  # runners start in benchmarks/runners

    start = time.perf_counter()
    if not args.skip_setup:
        venvs = sorted({RUNTIMES[n].venv for n in names} - {None})
        setup.setup(venvs)  # the HF folder and reference are always prepared
    if BASELINE in names:
        ensure_package(args.package)  # our packages, exported when missing (also with --skip-setup)
    setup_s = time.perf_counter() - start

    results = [run_runner(name, args.runs, args.threads, args.package) for name in names]
    table = markdown_table(results, args.threads, args.runs)
    print(table)
    write_results(args.results, args, setup.REFERENCE if setup.REFERENCE.is_file() else None,
                  setup_s, results, table)


def write_results(path: Path, args, reference: Path | None, setup_s: float, results: list, table: str,
                  **extra) -> None:
    """The JSON beside a table: when, the command, the machine, the protocol, every row (also
    used by openvino_bench.py)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": machine(),
        **extra,
        "protocol": {"prompt_tokens": 32, "new_tokens": 128, "batch": 8, "greedy": True,
                     "threads": args.threads, "runs": args.runs,
                     "reference": json.loads(reference.read_text())["source"] if reference else None},
        "setup_s": round(setup_s, 1),
        "results": results,
        "table_markdown": table,
    }, indent=2) + "\n")
    logger.info("wrote %s", path)


if __name__ == "__main__":
    main()
