"""The memory-bandwidth ceiling of fp32 decoding on this machine, measured, next to the fp32 rows of
the last CPU comparison (``benchmarks/results/cpu.json``).

    .venv/bin/python benchmarks/roofline.py [--threads 2] [--runs 15] [--results benchmarks/results/cpu.json]

A batch-1 decode step of an fp32 model reads every weight it multiplies once: SmolLM2-135M's 30
layers (q, k, v, o, gate, up, down) and its tied lm_head, 538 MB, more than any cache here. The
script builds exactly that set of fp32 MatMuls (random weights: speed depends on shapes) as one
ONNX Runtime graph, times it with the runtimes' thread count, and reports the bytes per second
ONNX Runtime's own fp32 kernels reach, and those of plain numpy sums over 512 MiB on as many
threads (best of ``--runs`` each: a ceiling is the best the machine gives). The ceiling for any
fp32 runtime of this model is the faster of the two divided by the bytes a token reads:
no fp32 decode loop can beat it by more than what attention, norms and the host loop cost on top.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "cpu.json"
HIDDEN, INTER, KV, LAYERS, VOCAB = 576, 1536, 192, 30, 49152
# (in, out) of one layer's matmuls, then the lm_head
LAYER = ((HIDDEN, HIDDEN), (HIDDEN, KV), (HIDDEN, KV), (HIDDEN, HIDDEN), (HIDDEN, INTER), (HIDDEN, INTER),
         (INTER, HIDDEN))
SHAPES = LAYER * LAYERS + ((HIDDEN, VOCAB),)


def gemv_graph(rng: np.random.Generator):
    """One graph: y_i = x_K @ W_i for every weight; the outputs are kept so nothing is pruned."""
    from onnx import TensorProto, helper, numpy_helper

    inputs = {k: helper.make_tensor_value_info(f"x{k}", TensorProto.FLOAT, [1, k]) for k in (HIDDEN, INTER)}
    nodes, inits, outs = [], [], []
    for i, (k, n) in enumerate(SHAPES):
        inits.append(numpy_helper.from_array(rng.standard_normal((k, n), np.float32), f"w{i}"))
        nodes.append(helper.make_node("MatMul", [f"x{k}", f"w{i}"], [f"y{i}"]))
        outs.append(helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, [1, n]))
    graph = helper.make_graph(nodes, "gemv", list(inputs.values()), outs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def ort_bandwidth(threads: int, runs: int) -> tuple[float, int]:
    """(bytes/s ONNX Runtime's fp32 GEMVs reach over the whole weight set, weight bytes)."""
    import onnxruntime as ort

    rng = np.random.default_rng(0)
    model = gemv_graph(rng).SerializeToString()
    nbytes = sum(k * n * 4 for k, n in SHAPES)
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    sess = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
    del model
    feeds = {f"x{k}": rng.standard_normal((1, k), np.float32) for k in (HIDDEN, INTER)}
    for _ in range(3):  # first runs fault pages in and warm the thread pool
        sess.run(None, feeds)
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        sess.run(None, feeds)
        times.append(time.perf_counter() - t)
    return nbytes / min(times), nbytes


def numpy_read_bandwidth(runs: int, threads: int) -> float:
    """Bytes/s of numpy sums over 512 MiB split between ``threads`` threads (sums release the GIL)."""
    from concurrent.futures import ThreadPoolExecutor

    parts = np.array_split(np.ones(128 << 20, np.float32), threads)
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(np.sum, parts))
        times = []
        for _ in range(runs):
            t = time.perf_counter()
            list(pool.map(np.sum, parts))
            times.append(time.perf_counter() - t)
    return sum(p.nbytes for p in parts) / min(times)


def fp32_rows(path: Path) -> list[tuple[str, float]]:
    if not path.is_file():
        return []
    rows = json.loads(path.read_text()).get("results", [])
    return [(r["runtime"], r["decode_tok_s"]) for r in rows
            if r.get("decode_tok_s") and r.get("runtime", "").endswith("fp32")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--results", type=Path, default=RESULTS, help="the CPU comparison's JSON")
    args = ap.parse_args()
    bw, nbytes = ort_bandwidth(args.threads, args.runs)
    np_bw = numpy_read_bandwidth(args.runs, args.threads)
    ceiling = max(bw, np_bw) / nbytes  # the faster reader bounds every fp32 runtime
    print(f"fp32 weights read per token: {nbytes / 1e6:.0f} MB; {args.threads} threads\n")
    print("| measure | GB/s | fp32 tok/s this allows |\n|---|---:|---:|")
    print(f"| ONNX Runtime fp32 GEMVs over those weights (best of {args.runs}) | {bw / 1e9:.1f} | {bw / nbytes:.1f} |")
    print(f"| numpy sums, {args.threads} threads, 512 MiB (best of {args.runs}) | {np_bw / 1e9:.1f} | {np_bw / nbytes:.1f} |")
    rows = fp32_rows(args.results)
    if rows:
        print(f"\nfp32 decode in {args.results} (its own run) against that ceiling:\n")
        print(f"| runtime | decode tok/s | of the ceiling ({ceiling:.1f} tok/s) | 3x of it | 3x needs GB/s |\n|---|---:|---:|---:|---:|")
        for name, tps in rows:
            print(f"| {name} | {tps:.1f} | {tps / ceiling:.0%} | {3 * tps:.1f} | {3 * tps * nbytes / 1e9:.1f} |")


if __name__ == "__main__":
    main()
