"""Edge footprint of the runtime: install size, import time, start-to-first-token, peak RSS.

    python benchmarks/edge_footprint.py [--bundle MODEL.pinf] [--threads 2] [--fresh]

Builds two runtime-only virtualenvs under ``.bench/edge/`` (reused on later runs; ``--fresh``
rebuilds them) with the repository installed ``--no-deps`` plus:

    core      onnxruntime numpy tokenizers jinja2, as pip resolves them (what
              ``pip install portable-infer`` gives: tokenizers pulls huggingface_hub and its tree)
    minimal   the same with ``tokenizers --no-deps`` (the runtime only calls Tokenizer.from_file)

and packs the default model (SmolLM2-135M-Instruct, int4) as ``.pinf`` and ``.pinf --ort`` with
this interpreter (which needs the exporter the first time). Every measurement runs in a fresh
process of the ``core`` venv. Prints markdown tables.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORK = REPO / ".bench" / "edge"
CORE = ["onnxruntime", "numpy", "tokenizers", "jinja2"]

FIRST_TOKEN = textwrap.dedent("""
    import sys
    import portable_infer
    m = portable_infer.load(sys.argv[1], "cpu", intra_op_threads=int(sys.argv[2]), check=sys.argv[3],
                            low_memory=sys.argv[4] == "1")
    for r in m.stream_chat([{"role": "user", "content": "What is the capital of France?"}], max_new_tokens=1):
        print("TOKEN", m.variant, flush=True)
""")

PEAK_RSS = textwrap.dedent("""
    import json, sys
    import portable_infer
    from portable_infer.engine.bench import prompt_ids
    def status():
        d = {}
        for line in open("/proc/self/status"):
            k, _, v = line.partition(":")
            if k in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
                d[k] = int(v.split()[0]) / 1024
        return d
    base = status()["VmRSS"]
    m = portable_infer.load(sys.argv[1], "cpu", intra_op_threads=int(sys.argv[2]), check="size",
                            low_memory=sys.argv[3] == "1")
    loaded = status()
    ids = prompt_ids(m, 32)
    m.generate_ids(ids, max_new_tokens=128, ignore_eos=True)
    d = m.manifest.model
    # fp32 cache of 160 tokens; fixed buffers hold their whole capacity (160 rounded up to 256)
    tokens = m.engine.new_cache(1, capacity=160).capacity if m.engine.variant.kv.growth == "static" else 160
    kv = 2 * d.num_layers * d.num_kv_heads * d.head_dim * 4 * tokens
    # the graph and its data file; fused-int8 and static read the fused graph's
    graph = m.engine.variant.file
    data = "model.fused.onnx.data" if m.variant in ("static", "fused-int8", "static-int8") else graph + ".data"
    weights = sum(e.size for e in m.manifest.files if e.path in (graph, data))
    print(json.dumps({"variant": m.variant, "import_rss": base, "loaded_rss": loaded["VmRSS"], **status(),
                      "kv_mib": kv / 2**20, "weights_mib": weights / 2**20}))
""")


def run(cmd, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if r.returncode != 0:
        sys.exit(f"{' '.join(map(str, cmd))} failed:\n{(r.stdout + r.stderr)[-3000:]}")
    return r


def make_venv(root: Path, minimal: bool, fresh: bool) -> Path:
    """The venv with its dependencies (made once, or again with ``fresh``) and this checkout's
    portable_infer (installed again on every run, so the numbers are of the code here)."""
    python = root / "bin" / "python"
    pip = [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--only-binary", ":all:"]
    made = python.exists() and not fresh
    if not made:
        shutil.rmtree(root, ignore_errors=True)
        run([sys.executable, "-m", "venv", "--without-pip", str(root)])
    with tempfile.TemporaryDirectory() as tmp:  # build from a copy: no build/ or egg-info in the repo
        src = Path(tmp) / "src"
        src.mkdir()
        for name in ("pyproject.toml", "README.md"):
            shutil.copy(REPO / name, src / name)
        for pkg in ("portable_infer", "exporters"):
            shutil.copytree(REPO / pkg, src / pkg, ignore=shutil.ignore_patterns("__pycache__"))
        run([*pip[:-2], "--no-deps", "--force-reinstall", str(src)])
        if made:
            return python
        if minimal:
            run([*pip, "--no-deps", "tokenizers"])
            run([*pip, *[p for p in CORE if p != "tokenizers"]])
        else:
            run([*pip, *CORE])
    return python


def site_packages_mib(python: Path) -> tuple:
    sp = Path(run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    total = sum(f.stat().st_size for f in sp.rglob("*") if f.is_file() and not f.is_symlink())
    dists = len(list(sp.glob("*.dist-info")))
    return total / 2**20, dists


def import_seconds(python: Path, runs: int = 5) -> float:
    code = "import time; t = time.perf_counter(); import portable_infer; print(time.perf_counter() - t)"
    return statistics.median(float(run([str(python), "-c", code]).stdout) for _ in range(runs))


def first_token_seconds(python: Path, bundle: Path, home: Path, threads: int, check: str, low: bool) -> tuple:
    env = {**os.environ, "PORTABLE_INFER_HOME": str(home)}
    t = time.perf_counter()
    p = subprocess.Popen([str(python), "-c", FIRST_TOKEN, str(bundle), str(threads), check, "1" if low else "0"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    line = p.stdout.readline()
    elapsed = time.perf_counter() - t
    _, err = p.communicate()
    if p.returncode != 0 or not line.startswith("TOKEN"):
        sys.exit(f"first-token run failed:\n{err[-3000:]}")
    return elapsed, line.split()[1]


def peak_rss(python: Path, bundle: Path, home: Path, threads: int, low: bool) -> dict:
    env = {**os.environ, "PORTABLE_INFER_HOME": str(home)}
    out = run([str(python), "-c", PEAK_RSS, str(bundle), str(threads), "1" if low else "0"], env=env).stdout
    return json.loads(out.strip().splitlines()[-1])


def default_bundles(fresh: bool) -> tuple:
    sys.path.insert(0, str(REPO))
    from portable_infer.loader import default_model
    from portable_infer.package.bundle import pack

    pkg = default_model(progress=True)
    out = []
    for name, ort in (("smollm2-int4.pinf", False), ("smollm2-int4-ort.pinf", True)):
        path = WORK / name
        if fresh or not path.exists():
            pack(pkg, path, ort=ort, overwrite=True)
        out.append(path)
    return tuple(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, default=None, help="a .pinf (default: the default model, packed here)")
    ap.add_argument("--ort-bundle", type=Path, default=None, help="the same model packed with --ort")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--fresh", action="store_true", help="rebuild the venvs and bundles")
    ns = ap.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    bundle, ort_bundle = (ns.bundle, ns.ort_bundle) if ns.bundle else default_bundles(ns.fresh)
    venvs = {"core": make_venv(WORK / "venv-core", False, ns.fresh),
             "minimal": make_venv(WORK / "venv-minimal", True, ns.fresh)}
    python = venvs["core"]
    ort_version = run([str(python), "-c", "import onnxruntime; print(onnxruntime.__version__)"]).stdout.strip()

    print(f"## Runtime-only install (onnxruntime {ort_version}, Python {sys.version.split()[0]}, "
          f"{os.cpu_count()} CPUs)\n")
    print("| venv | site-packages MiB | distributions | `import portable_infer` s (median of 5) |")
    print("|---|---:|---:|---:|")
    for name, py in venvs.items():
        mib, dists = site_packages_mib(py)
        print(f"| {name} | {mib:.1f} | {dists} | {import_seconds(py):.3f} |")

    print(f"\n## Process start to first token ({ns.threads} threads; chat prompt, 1 new token)\n")
    print("| bundle | cache | check | low_memory | variant | seconds |")
    print("|---|---|---|---|---|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        cases = [(bundle, "cold (unpack)", "sha256", False), (bundle, "warm", "sha256", False),
                 (bundle, "warm", "size", False)]
        if ort_bundle:
            cases += [(ort_bundle, "cold (unpack)", "sha256", False), (ort_bundle, "warm", "size", False),
                      (ort_bundle, "warm", "size", True)]
        for b, cache, check, low in cases:
            s, variant = first_token_seconds(python, b, home, ns.threads, check, low)
            print(f"| {b.name} | {cache} | {check} | {low} | {variant} | {s:.2f} |")

        print(f"\n## Peak RSS ({ns.threads} threads; 32 prompt + 128 new tokens; fresh process each)\n")
        print("| bundle | low_memory | variant | weights MiB | KV MiB | after import | after load | peak (VmHWM) "
              "| end: anon / file | peak / (1.5 w + KV) |")
        print("|---|---|---|---:|---:|---:|---:|---:|---|---:|")
        for b in [bundle, ort_bundle] if ort_bundle else [bundle]:
            for low in (False, True):
                r = peak_rss(python, b, home, ns.threads, low)
                goal = 1.5 * r["weights_mib"] + r["kv_mib"]
                print(f"| {b.name} | {low} | {r['variant']} | {r['weights_mib']:.1f} | {r['kv_mib']:.1f} | "
                      f"{r['import_rss']:.0f} | {r['loaded_rss']:.0f} | {r['VmHWM']:.0f} | "
                      f"{r['RssAnon']:.0f} / {r['RssFile']:.0f} | {r['VmHWM'] / goal:.2f} |")


if __name__ == "__main__":
    main()
