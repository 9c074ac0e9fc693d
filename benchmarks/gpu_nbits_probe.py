"""Probe (GPU machine): one fp16 MatMulNBits of a SmolLM2 shape on CUDA, by rows, block size, zero
points and ONNX Runtime's fpA_intB switch (ORT_FPA_INTB_GEMM), against a dense fp16 MatMul.

    python3 benchmarks/gpu_nbits_probe.py [--k 576] [--n 3072] [--rows 1 16]

The graph holds COPIES such nodes (distinct random weights, one input), run as one captured CUDA
graph on IO-bound GPU buffers, so the time per node is kernel time, not launches. Prints µs per
node (median of 7 x 20 replays).
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np


COPIES = 40


def model(k: int, n: int, block: int, zp: bool, dense: bool) -> bytes:
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits, nodes = [], []
    for i in range(COPIES):
        if dense:
            inits.append(numpy_helper.from_array((rng.standard_normal((k, n)) * 0.02).astype(np.float16), f"W{i}"))
            nodes.append(helper.make_node("MatMul", ["x", f"W{i}"], [f"y{i}"]))
            continue
        nb = k // block
        inits += [numpy_helper.from_array(rng.integers(0, 256, (n, nb, block // 2), dtype=np.uint8), f"B{i}"),
                  numpy_helper.from_array((rng.random(n * nb) * 0.01).astype(np.float16), f"S{i}")]
        ins = ["x", f"B{i}", f"S{i}"]
        if zp:
            inits.append(numpy_helper.from_array(rng.integers(0, 256, n * ((nb + 1) // 2), dtype=np.uint8), f"Z{i}"))
            ins.append(f"Z{i}")
        nodes.append(helper.make_node("MatMulNBits", ins, [f"y{i}"], domain="com.microsoft", K=k, N=n, bits=4,
                                      block_size=block, accuracy_level=4))
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [None, k])],
                          [helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT16, [None, n])
                           for i in range(COPIES)], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    m.ir_version = 10
    return m.SerializeToString()


def time_call(sess, ort, rows: int, k: int, n: int) -> float:
    x = ort.OrtValue.ortvalue_from_numpy(np.random.default_rng(1).standard_normal((rows, k)).astype(np.float16),
                                         "cuda", 0)
    ys = [ort.OrtValue.ortvalue_from_shape_and_type([rows, n], np.float16, "cuda", 0) for _ in range(COPIES)]
    b = sess.io_binding()
    b.bind_ortvalue_input("x", x)
    for i, y in enumerate(ys):
        b.bind_ortvalue_output(f"y{i}", y)
    for _ in range(5):
        sess.run_with_iobinding(b)
    times = []
    for _ in range(7):
        t = time.perf_counter()
        for _ in range(20):
            sess.run_with_iobinding(b)
        b.synchronize_outputs()
        times.append((time.perf_counter() - t) / 20 / COPIES * 1e6)
    return float(np.median(times))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--k", type=int, default=576)
    ap.add_argument("--n", type=int, default=3072)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 16])
    args = ap.parse_args()
    import onnxruntime as ort

    print(f"onnxruntime {ort.__version__}, K={args.k} N={args.n}")
    cases = [("dense fp16 MatMul", 0, False, True, "0")]
    for block in (b for b in (32, 64, 128) if args.k % b == 0):
        for zp in (True, False):
            for fpa in ("0", "1"):
                cases.append((f"block {block} {'zero points' if zp else 'scale only'} fpA_intB={fpa}", block, zp, False, fpa))
    print("| case | " + " | ".join(f"{r} rows µs/node" for r in args.rows) + " |\n|---|" + "---:|" * len(args.rows))
    for name, block, zp, dense, fpa in cases:
        os.environ["ORT_FPA_INTB_GEMM"] = fpa
        so = ort.SessionOptions()
        so.add_session_config_entry("ep.cuda.fpa_intb_gemm", fpa)
        try:
            blob = model(args.k, args.n, block, zp, dense)
            cells = []
            for r in args.rows:  # one session per row count: a CUDA graph replays one shape
                sess = ort.InferenceSession(blob, so, providers=[("CUDAExecutionProvider", {"enable_cuda_graph": "1"})])
                cells.append(f"{time_call(sess, ort, r, args.k, args.n):.1f}")
        except Exception as exc:  # a combination this build refuses
            cells = [f"error: {str(exc).splitlines()[0][:80]}"] + [""] * (len(args.rows) - 1)
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
