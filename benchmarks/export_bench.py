"""Export wall time and peak RSS: ours, and ours against ONNX Runtime GenAI's model builder.

    .venv/bin/python benchmarks/export_bench.py [--runs 3] [--variants portable,fused]
        fp32 export of SmolLM2-135M (the default GGUF), without verification, against its fp32
        weight bytes. Goal: peak RSS at most 2x the fp32 weight bytes.

    .venv/bin/python benchmarks/export_bench.py --genai [--runs 1] [--layers N]
        int4 on the CPU at Llama-3.2-1B's shape (llama1b.py's random-weight HF folder, made by
        ``setup_competitors.py --models llama1b``), the same folder into both:
          ours:  portable-infer export HF -o OUT --precision int4       (default variants, verified)
                 ... --no-verify                                          (the exporter alone)
          GenAI: python -m onnxruntime_genai.models.builder -i HF -o OUT -p int4 -e cpu
                 (in setup_competitors' ortgenai venv)
        Goal (issue #20, item 5): ours at most GenAI's wall time and peak RSS. ``--layers N``
        (< 16) exports a copy of the folder cut to its first N layers (same seed, same other
        shapes; written once under .bench/llama1b-<N>l/): a quick check that the comparison runs
        end to end, not the 1B number.

Every run is a fresh process tree, started by a small wrapper that reports the tree's wall time
and peak RSS (``resource.getrusage(RUSAGE_CHILDREN).ru_maxrss`` after it exits: the largest
resident set of any process in it); commands alternate, ours first. The table names the CPU and
its ISA flags (``portable_infer.engine.host.describe``); the GenAI comparison is also written to
benchmarks/results/export.json (under ``llama1b-int4``, or ``llama1b-<N>l-int4`` for a cut copy).
Run it on a quiet machine: other processes change both numbers.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT))

import llama1b  # noqa: E402  (the 1B shape and its HF folder; stdlib only at import)

RESULTS = ROOT / "benchmarks" / "results" / "export.json"
GENAI_PYTHON = ROOT / ".bench" / "venvs" / "ortgenai" / "bin" / "python"

CHILD = r"""
import json, resource, sys, time
t0 = time.perf_counter()
from exporters.export import export
from portable_infer.package.manifest import Manifest
out = sys.argv[1]
t = time.perf_counter()
export("default", out, precision="fp32", verify=False, variants=tuple(sys.argv[2].split(",")))
wall = time.perf_counter() - t
m = Manifest.load(out)
d = m.model
params = (d.vocab_size * d.hidden_size + d.num_layers * (
    d.hidden_size * (d.num_heads + 2 * d.num_kv_heads) * d.head_dim + d.num_heads * d.head_dim * d.hidden_size
    + 3 * d.hidden_size * d.intermediate_size + 2 * d.hidden_size) + d.hidden_size)
print(json.dumps({"wall_s": wall, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "weights_fp32_mib": params * 4 / 2**20,
                  "package_mib": sum(f.size for f in m.files) / 2**20}))
"""

# Runs one command (argv[1:]) as a child and prints its process tree's wall time and peak RSS.
TREE = r"""
import json, resource, subprocess, sys, time
t = time.perf_counter()
rc = subprocess.run(sys.argv[1:]).returncode
wall = time.perf_counter() - t
print(json.dumps({"rc": rc, "wall_s": wall,
                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))
"""


def fp32_smollm2(runs: int, variants: str) -> None:
    rows = []
    for _ in range(runs):
        with tempfile.TemporaryDirectory() as tmp:
            out = subprocess.run([sys.executable, "-c", CHILD, str(Path(tmp) / "pkg"), variants],
                                 cwd=ROOT, capture_output=True, text=True, check=True)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    ratio = med["peak_rss_mib"] / med["weights_fp32_mib"]
    print(f"fp32 export of SmolLM2-135M (default GGUF), variants {variants}, median of {runs} runs")
    print("| wall s | peak RSS MiB | fp32 weights MiB | RSS / weights | package MiB | goal |")
    print("|---|---|---|---|---|---|")
    print(f"| {med['wall_s']:.1f} | {med['peak_rss_mib']:.0f} | {med['weights_fp32_mib']:.0f} | {ratio:.2f}x | "
          f"{med['package_mib']:.0f} | <= 2.0x: {'met' if ratio <= 2 else 'NOT met'} |")


# --- ours against GenAI's builder, int4 at the 1B shape -----------------------------------------
def cut_folder(layers: int) -> Path:
    """llama1b.py's HF folder with only its first ``layers`` layers (the same seeded weights, the
    same other shapes), written once under .bench/llama1b-<layers>l/hf."""
    out = llama1b.BENCH / f"llama1b-{layers}l" / "hf"
    if (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file():
        return out
    import numpy as np
    from safetensors.numpy import save_file

    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(llama1b.SEED)  # drawn in llama1b's order, so the kept layers match
    tensors = {}
    for name, shape in llama1b.tensor_shapes():
        keep = not name.startswith("model.layers.") or int(name.split(".")[2]) < layers
        if len(shape) == 1:
            value = np.ones(shape, np.float32)
        else:
            value = rng.standard_normal(shape, dtype=np.float32) * np.float32(llama1b.STD)
        if keep:
            tensors[name] = value
        if name.startswith(f"model.layers.{layers}."):
            break  # the later layers are not needed, the final norm is written below
    tensors["model.norm.weight"] = np.ones((llama1b.CONFIG["hidden_size"],), np.float32)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(dict(llama1b.CONFIG, num_hidden_layers=layers), indent=2) + "\n")
    llama1b.write_tokenizer(out)
    return out


def commands(hf: Path, out: Path, cache: Path) -> dict[str, list[str]]:
    ours = [sys.executable, "-m", "portable_infer.cli", "export", str(hf), "-o", str(out), "--precision", "int4"]
    return {
        "ours": ours,
        "ours --no-verify": ours + ["--no-verify"],
        "GenAI builder": [str(GENAI_PYTHON), "-m", "onnxruntime_genai.models.builder", "-i", str(hf),
                          "-o", str(out), "-p", "int4", "-e", "cpu", "-c", str(cache)],
    }


def run_tree(argv: list[str], log: Path) -> dict:
    """One command in a fresh process tree: its wall time and peak RSS (raises when it fails)."""
    with open(log, "w") as f:
        done = subprocess.run([sys.executable, "-c", TREE, *argv], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=f, text=True)
    lines = done.stdout.strip().splitlines()
    result = json.loads(lines[-1]) if lines else {"rc": done.returncode}
    if result["rc"] != 0:
        tail = log.read_text(errors="replace")[-3000:]
        raise SystemExit(f"{' '.join(argv)} failed (exit {result['rc']}); its output ends:\n{tail}")
    return result


def _size_mib(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**20


def genai_comparison(runs: int, layers: int) -> dict:
    from portable_infer.engine.host import describe

    if not GENAI_PYTHON.is_file():
        raise SystemExit(f"{GENAI_PYTHON} is missing: run benchmarks/setup_competitors.py --only ortgenai first")
    hf = llama1b.HF if layers == llama1b.CONFIG["num_hidden_layers"] else cut_folder(layers)
    if not (hf / "model.safetensors").is_file():
        raise SystemExit(f"{hf} is missing: run benchmarks/setup_competitors.py --models llama1b first")
    rows: dict[str, list] = {}
    with tempfile.TemporaryDirectory(dir=llama1b.BENCH) as tmp:
        tmp = Path(tmp)
        for i in range(runs):
            for name, argv in commands(hf, tmp / "out", tmp / "cache").items():
                shutil.rmtree(tmp / "out", ignore_errors=True)
                shutil.rmtree(tmp / "cache", ignore_errors=True)
                r = run_tree(argv, tmp / "log.txt")
                r["package_mib"] = _size_mib(tmp / "out")
                rows.setdefault(name, []).append(r)
                print(f"run {i + 1}/{runs} {name}: {r['wall_s']:.1f} s, peak RSS {r['peak_rss_mib']:.0f} MiB",
                      flush=True)
    median = {name: {k: statistics.median(r[k] for r in rs) for k in ("wall_s", "peak_rss_mib", "package_mib")}
              for name, rs in rows.items()}
    shown = commands(Path("HF"), Path("OUT"), Path("CACHE"))
    return {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "host": describe(), "hf_folder": str(hf.relative_to(ROOT)),
            "layers": layers, "runs": runs, "median": median, "all_runs": rows,
            "commands": {name: " ".join(_shown(a) for a in argv) for name, argv in shown.items()}}


def _shown(arg: str) -> str:
    """A command-line word as the table prints it: interpreters relative to the repository."""
    if arg == sys.executable:
        return ".venv/bin/python"
    return str(Path(arg).relative_to(ROOT)) if arg.startswith(str(ROOT)) else arg


def print_table(result: dict) -> str:
    med, genai = result["median"], result["median"]["GenAI builder"]
    lines = [f"int4 export on the CPU, Llama-3.2-1B shape ({result['layers']} layers: {result['hf_folder']}), "
             f"median of {result['runs']} run(s)", f"CPU: {result['host']}", "",
             "| exporter | wall s | peak RSS MiB | package MiB | wall / GenAI | RSS / GenAI |",
             "|---|---|---|---|---|---|"]
    for name, m in med.items():
        lines.append(f"| {name} | {m['wall_s']:.1f} | {m['peak_rss_mib']:.0f} | {m['package_mib']:.0f} | "
                     f"{m['wall_s'] / genai['wall_s']:.2f}x | {m['peak_rss_mib'] / genai['peak_rss_mib']:.2f}x |")
    lines += ["", *(f"{name}: `{cmd}`" for name, cmd in result["commands"].items())]
    text = "\n".join(lines)
    print(text)
    return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=None, help="runs per exporter (default 3 fp32, 1 --genai)")
    ap.add_argument("--variants", default="portable,fused", help="fp32 SmolLM2 mode: variants to write")
    ap.add_argument("--genai", action="store_true", help="int4 at the 1B shape: ours against GenAI's builder")
    ap.add_argument("--layers", type=int, default=llama1b.CONFIG["num_hidden_layers"],
                    help="--genai: layers of the folder (fewer: a cut copy, to check the comparison runs)")
    args = ap.parse_args()
    if not args.genai:
        fp32_smollm2(args.runs or 3, args.variants)
        return
    if not 1 <= args.layers <= llama1b.CONFIG["num_hidden_layers"]:
        raise SystemExit(f"--layers must be in 1..{llama1b.CONFIG['num_hidden_layers']}, got {args.layers}")
    result = genai_comparison(args.runs or 1, args.layers)
    result["table_markdown"] = print_table(result)
    key = "llama1b-int4" if args.layers == llama1b.CONFIG["num_hidden_layers"] else f"llama1b-{args.layers}l-int4"
    saved = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    saved[key] = result
    RESULTS.write_text(json.dumps(saved, indent=2) + "\n")
    print(f"\nwritten to {RESULTS.relative_to(ROOT)} [{key}]")


if __name__ == "__main__":
    main()
