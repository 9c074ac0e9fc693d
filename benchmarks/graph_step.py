"""Time one decode step of package graphs through ONNX Runtime alone (no decode loop), A/B in one process.

    .venv/bin/python benchmarks/graph_step.py PKG/model.fused.onnx OTHER/model.fused.onnx ...
        [--threads 2] [--past 40] [--config session.disable_prepacking=1]
    .venv/bin/python benchmarks/graph_step.py --matmulnbits     # the MatMulNBits kernel variants
    .venv/bin/python benchmarks/graph_step.py --matmulnbits --rows 1 2 4 8 16 32   # by row count

Graphs: batch 1, one new token after ``--past`` random KV rows; the graphs take turns, 9 rounds
of 10 steps, median and min per graph (the machine's noise hits all of them alike). Also prints the
resident memory the session added. ``--matmulnbits`` times single MatMulNBits nodes of the
SmolLM2 shapes: accuracy level 1 (float activations) vs 4 (int8), with and without a zero-point
input, and the Q4_1 offset correction (ReduceSum + MatMul + Add).
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def rss_mib() -> float:
    status = open("/proc/self/status").read()
    return int(status.split("VmRSS:")[1].split()[0]) / 1024


def session(path, threads: int, config: list):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    for kv in config:
        key, value = kv.split("=", 1)
        so.add_session_config_entry(key, value)
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def step_feeds(sess, past: int, head_dim: int) -> dict:
    rng = np.random.default_rng(0)
    feeds = {"input_ids": np.array([[5]], np.int64), "attention_mask": np.ones((1, past + 1), np.int64),
             "position_ids": np.array([[past]], np.int64)}
    for i in sess.get_inputs():
        if i.name.startswith("past_key_values"):
            d = i.shape[3] if isinstance(i.shape[3], int) else head_dim  # GenAI names this dim
            feeds[i.name] = rng.standard_normal((1, i.shape[1], past, d)).astype(np.float32)
    names = {i.name for i in sess.get_inputs()}
    return {k: v for k, v in feeds.items() if k in names}


def graphs(args) -> None:
    rows = []
    for path in args.graphs:
        before = rss_mib()
        s = session(path, args.threads, args.config)
        rows.append([path, s, step_feeds(s, args.past, args.head_dim), rss_mib() - before, []])
    for _, s, f, _, _ in rows:
        for _ in range(3):
            s.run(["logits"], f)
    for _ in range(9):
        for row in rows:
            t = time.perf_counter()
            for _ in range(10):
                row[1].run(["logits"], row[2])
            row[4].append((time.perf_counter() - t) / 10 * 1e3)
    print(f"| graph | config | ms/step median | min | RSS added MiB |\n|---|---|---:|---:|---:|")
    for path, _, _, mib, times in rows:
        print(f"| {path} | {' '.join(args.config) or '-'} | {np.median(times):.2f} | {min(times):.2f} | {mib:.0f} |")


def nbits_model(K, N, acc, zp, corr, bits=4, dense=False):
    """One MatMulNBits (or, with ``dense``, a float MatMul of the same shape) over x [1, rows, K]."""
    from onnx import TensorProto, helper, numpy_helper

    nb = K // 32
    rng = np.random.default_rng(0)
    if dense:
        inits = [numpy_helper.from_array(rng.standard_normal((K, N)).astype(np.float32), "W")]
        nodes = [helper.make_node("MatMul", ["x", "W"], ["y"])]
    else:
        inits = [numpy_helper.from_array(rng.integers(0, 255, (N, nb, 4 * bits), dtype=np.uint8), "B"),
                 numpy_helper.from_array((rng.random(N * nb) * 0.01).astype(np.float32), "S")]
        ins = ["x", "B", "S"]
        if zp:
            inits.append(numpy_helper.from_array(
                rng.integers(0, 255, N * (nb if bits == 8 else (nb + 1) // 2), dtype=np.uint8), "Z"))
            ins.append("Z")
        nodes = [helper.make_node("MatMulNBits", ins, ["y0" if corr else "y"], domain="com.microsoft",
                                  K=K, N=N, bits=bits, block_size=32, accuracy_level=acc)]
    if corr:  # y = y0 + blocksum(x) @ offset
        inits += [numpy_helper.from_array(np.array([0, 0, nb, 32], np.int64), "shape"),
                  numpy_helper.from_array(np.array([-1], np.int64), "axis"),
                  numpy_helper.from_array(rng.random((nb, N)).astype(np.float32), "offset")]
        nodes += [helper.make_node("Reshape", ["x", "shape"], ["xb"]),
                  helper.make_node("ReduceSum", ["xb", "axis"], ["bs"], keepdims=0),
                  helper.make_node("MatMul", ["bs", "offset"], ["c"]), helper.make_node("Add", ["y0", "c"], ["y"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "rows", K])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "rows", N])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    m.ir_version = 10
    return m.SerializeToString()


def matmulnbits(threads: int) -> None:
    cases = [("acc 1", 1, 0, 0), ("acc 1 + Q4_1 correction", 1, 0, 1), ("acc 1 + zero points", 1, 1, 0),
             ("acc 4", 4, 0, 0), ("acc 4 + Q4_1 correction", 4, 0, 1), ("acc 4 + zero points", 4, 1, 0),
             ("8-bit acc 4 + zero points", 4, 1, 0, 8)]
    shapes = [(576, 960), (576, 576), (576, 3072), (1536, 576)]
    print("| K x N | " + " | ".join(c[0] for c in cases) + " |\n|---|" + "---:|" * len(cases))
    for K, N in shapes:
        cells = []
        for _, acc, zp, corr, *bits in cases:
            s = session(nbits_model(K, N, acc, zp, corr, *bits), threads, [])
            x = {"x": np.random.default_rng(1).standard_normal((1, 1, K)).astype(np.float32)}
            for _ in range(20):
                s.run(None, x)
            times = []
            for _ in range(5):
                t = time.perf_counter()
                for _ in range(200):
                    s.run(None, x)
                times.append((time.perf_counter() - t) / 200 * 1e6)
            cells.append(f"{np.median(times):.1f}")
        print(f"| {K} x {N} | " + " | ".join(cells) + " |  (µs per matvec)")


def by_rows(threads: int, rows: list) -> None:
    """A 576x3072 weight by row count: float and int8 activations, and the dense float MatMul.
    Above one row, MatMulNBits' float path dequantizes the weight into fp32 panels on every call."""
    cases = [("acc 1 + zero points", dict(acc=1, zp=1)), ("acc 4 + zero points", dict(acc=4, zp=1)),
             ("dense fp32 MatMul", dict(acc=1, zp=0, dense=True))]
    sessions = [session(nbits_model(576, 3072, corr=0, **kw), threads, []) for _, kw in cases]
    print("| rows | " + " | ".join(c[0] for c in cases) + " |\n|---:|" + "---:|" * len(cases))
    for m in rows:
        x = {"x": np.random.default_rng(1).standard_normal((1, m, 576)).astype(np.float32)}
        times = [[] for _ in sessions]
        for s in sessions:
            s.run(None, x)
        for _ in range(7):  # the kernels take turns: the machine's noise hits them alike
            for s, t_list in zip(sessions, times):
                t = time.perf_counter()
                for _ in range(20):
                    s.run(None, x)
                t_list.append((time.perf_counter() - t) / 20 * 1e6)
        print(f"| {m} | " + " | ".join(f"{np.median(t):.0f}" for t in times) + " |  (µs per call)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("graphs", nargs="*")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--past", type=int, default=40)
    ap.add_argument("--head-dim", type=int, default=64, help="for graphs whose KV head dim is symbolic")
    ap.add_argument("--config", action="append", default=[], help="session config entry key=value")
    ap.add_argument("--matmulnbits", action="store_true")
    ap.add_argument("--rows", type=int, nargs="+", default=None,
                    help="with --matmulnbits: time a 576x3072 weight at these row counts instead")
    args = ap.parse_args()
    if args.matmulnbits:
        by_rows(args.threads, args.rows) if args.rows else matmulnbits(args.threads)
    if args.graphs:
        graphs(args)


if __name__ == "__main__":
    main()
