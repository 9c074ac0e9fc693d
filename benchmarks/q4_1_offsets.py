"""What Q4_1's block offsets cost in ONNX Runtime's MatMulNBits kernels (issue 18, item 1).

A Q4_1 block holds ``w = d * q + m`` (q in 0..15, float d and m per 32 weights). MatMulNBits
holds ``w = s * (q - z)`` with an integer zero point z, so a Q4_1 block fits it exactly only when
``-m / d`` is an integer, which it almost never is. The forms that keep the source's weights:

    plain   4-bit, the offset rounded into z (not exact: 74 % top-1 agreement on SmolLM2,
            docs/benchmarks.md), for the kernel's own cost
    plain8  8-bit codes 16 q + c with scale d / 16 (within d / 32 of the source: the -q4 form)
    aug     4-bit, K augmented with the block sums of x (MatMul by a block indicator + Concat):
            the exact form of static-int8 / fused-int8 (weight_ops.WeightOps.augment)
    sep     4-bit + ReduceSum block sums, MatMul by the offsets, Add
    sep_mm  as sep, block sums by MatMul
    gemm    as sep, Gemm(sums, offsets, C = MatMulNBits(x))
    mm_gemm block sums by MatMul, then Gemm(sums, offsets, C = MatMulNBits(x)): two nodes
    floatzp 4-bit with float zero points (exact; ONNX Runtime runs it on a slow fallback path)

Each form runs a chain of 2 x LAYERS linears (K -> N -> K, distinct weights, so they stream from
memory as in a model), int8 activations (accuracy_level 4; ``--accuracy 1``: float activations, the
exact graphs' kernel), batch 1, median of 5 runs of 100.
Single nodes (weights hot in cache) are ``benchmarks/graph_step.py --matmulnbits``.

    .venv/bin/python benchmarks/q4_1_offsets.py [--shape 576 1536] [--threads 2] [--forms ...]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

BLOCK, LAYERS = 32, 24
FORMS = ("plain", "plain8", "aug", "sep", "sep_mm", "gemm", "mm_gemm", "floatzp")


def _weights(rng, k: int, n: int, name: str, inits: list, bits: int = 4, float_zero: bool = False) -> list:
    from onnx import numpy_helper as nh

    nb = k // BLOCK
    q = rng.integers(0, 2 ** bits, (n, nb, BLOCK), dtype=np.uint8)
    packed = (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8) if bits == 4 else q
    scale = rng.uniform(.01, .02, n * nb).astype(np.float32)
    if float_zero:
        zero = rng.uniform(0, 15, n * nb).astype(np.float32)
    else:
        zero = rng.integers(0, 256, (n * ((nb + 1) // 2) if bits == 4 else n * nb,), dtype=np.uint8)
    inits += [nh.from_array(packed, name + "B"), nh.from_array(scale, name + "S"), nh.from_array(zero, name + "Z")]
    return [name + "B", name + "S", name + "Z"]


def _nbits(x: str, k: int, n: int, name: str, out: str, rng, nodes: list, inits: list, bits: int = 4,
           float_zero: bool = False, accuracy: int = 4) -> None:
    from onnx import helper as h

    nodes.append(h.make_node("MatMulNBits", [x, *_weights(rng, k, n, name, inits, bits, float_zero)], [out],
                             domain="com.microsoft", K=k, N=n, bits=bits, block_size=BLOCK, accuracy_level=accuracy))


def _block_sums(x: str, k: int, name: str, by_matmul: bool, nodes: list, inits: list) -> str:
    from onnx import helper as h, numpy_helper as nh

    nb = k // BLOCK
    if by_matmul:
        ind = np.kron(np.eye(nb, dtype=np.float32), np.ones((BLOCK, 1), np.float32))
        inits.append(nh.from_array(ind, name + "ind"))
        nodes.append(h.make_node("MatMul", [x, name + "ind"], [name + "s"]))
    else:
        inits += [nh.from_array(np.array([1, nb, BLOCK], np.int64), name + "shp"),
                  nh.from_array(np.array([2], np.int64), name + "ax")]
        nodes.append(h.make_node("Reshape", [x, name + "shp"], [name + "xr"]))
        nodes.append(h.make_node("ReduceSum", [name + "xr", name + "ax"], [name + "s"], keepdims=0))
    return name + "s"


def linear(x: str, k: int, n: int, name: str, form: str, rng, nodes: list, inits: list, accuracy: int = 4) -> str:
    from onnx import helper as h, numpy_helper as nh

    y, nb = name + "y", k // BLOCK
    if form in ("plain", "plain8", "floatzp"):
        _nbits(x, k, n, name, y, rng, nodes, inits, 8 if form == "plain8" else 4, form == "floatzp", accuracy)
    elif form == "aug":
        s = _block_sums(x, k, name, True, nodes, inits)
        pad = (-nb) % BLOCK
        parts = [x, s]
        if pad:
            inits.append(nh.from_array(np.zeros((1, pad), np.float32), name + "pad"))
            parts.append(name + "pad")
        nodes.append(h.make_node("Concat", parts, [name + "xa"], axis=-1))
        _nbits(name + "xa", k + nb + pad, n, name, y, rng, nodes, inits, accuracy=accuracy)
    else:  # sep, sep_mm, gemm: y = MatMulNBits(x) + sums(x) @ offsets
        s = _block_sums(x, k, name, form in ("sep_mm", "mm_gemm"), nodes, inits)
        inits.append(nh.from_array(rng.standard_normal((nb, n)).astype(np.float32) * 1e-3, name + "R"))
        _nbits(x, k, n, name, name + "m", rng, nodes, inits, accuracy=accuracy)
        if form in ("gemm", "mm_gemm"):
            nodes.append(h.make_node("Gemm", [s, name + "R", name + "m"], [y]))
        else:
            nodes.append(h.make_node("MatMul", [s, name + "R"], [name + "c"]))
            nodes.append(h.make_node("Add", [name + "m", name + "c"], [y]))
    return y


def session(form: str, k: int, n: int, threads: int, accuracy: int = 4):
    import onnxruntime as ort
    from onnx import TensorProto, helper as h

    rng = np.random.default_rng(20261202)
    nodes, inits, x = [], [], "X"
    for i in range(LAYERS):
        x = linear(linear(x, k, n, f"a{i}", form, rng, nodes, inits, accuracy), n, k, f"b{i}", form, rng, nodes, inits,
                   accuracy)
    graph = h.make_graph(nodes, form, [h.make_tensor_value_info("X", TensorProto.FLOAT, [1, k])],
                         [h.make_tensor_value_info(x, TensorProto.FLOAT, [1, k])], inits)
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 18), h.make_opsetid("com.microsoft", 1)])
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def main() -> None:
    from portable_infer.engine import host

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", type=int, nargs=2, default=(576, 1536), metavar=("K", "N"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--forms", nargs="+", default=list(FORMS), choices=FORMS)
    p.add_argument("--accuracy", type=int, default=4, choices=(1, 4),
                   help="MatMulNBits accuracy_level: 4 int8 activations, 1 float (the exact graphs')")
    args = p.parse_args()
    k, n = args.shape
    x = np.random.default_rng(1).standard_normal((1, k)).astype(np.float32)
    sessions = {f: session(f, k, n, args.threads, args.accuracy) for f in args.forms}
    times = {f: [] for f in args.forms}
    for _ in range(5):  # rounds alternate the forms, so drift hits all alike
        for f, s in sessions.items():
            for _ in range(5):
                s.run(None, {"X": x})
            start = time.perf_counter()
            for _ in range(100):
                s.run(None, {"X": x})
            times[f].append((time.perf_counter() - start) / 100 * 1e3)
    base = float(np.median(times["plain"])) if "plain" in times else None
    print(f"CPU: {host.describe()}\n")
    print(f"| form ({2 * LAYERS} linears {k}x{n} and back, {args.threads} threads, accuracy {args.accuracy}) | ms per chain (median of 5) "
          "| us per linear over plain |")
    print("|---|---|---|")
    for f in args.forms:
        med = float(np.median(times[f]))
        extra = f"{(med - base) / (2 * LAYERS) * 1e3:+.1f}" if base is not None else "n/a"
        print(f"| {f} | {med:.3f} | {extra} |")


if __name__ == "__main__":
    main()
