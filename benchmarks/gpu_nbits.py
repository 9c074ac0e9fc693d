"""One linear on CUDA by weight form: fp16 MatMul against MatMulNBits (4-bit, block 32 / 64 / 128,
uint8 zero points or none), fp16 activations, at the 8B shape's layer sizes and several batch rows
(issue #21: int4 8B at 256 streams ran slower than fp16; is it the kernel, and which block size
takes ONNX Runtime's fast path?).

    PYTHONPATH=/root/site python3 benchmarks/gpu_nbits.py [--rows 1 16 64 256] [--iters 100] [--out DIR]
        [--fpa-intb]

Forms ``gemm`` / ``gemmt`` / ``fusedt``: the fp16 weight under Gemm, stored [K, N] or transposed
[N, K] (``transB``; each output a dot product along contiguous K, the layout GEMV kernels favour
at one row), or transposed under FusedMatMul (which, unlike Gemm, takes the decode graphs' 3-D
activations): does the fp16 decode at batch 1 read its weights faster in another layout?

Forms ``splitk<S>`` / ``splitk<S>t``: the fp16 weight split along K into S parts ([S, K/S, N], or
[S, N, K/S] under FusedMatMul ``transB``): one batched GEMM of S GEMVs, then ReduceSum over the
parts (split-K in the graph: S times the thread blocks at one row, where cuBLAS reads the small and
the tall linears at 1.8-2.7 TB/s of the H200's 4.8; issue #21's batch-1 target).

Forms ``dq-32`` / ``dq-fold-32``: the packages' portable weight form (4-bit codes, blocked
DequantizeLinear, MatMul) as is, and with ``session.disable_quant_qdq`` set, which lets ONNX
Runtime's constant folding dequantize the weights once at load (fp16 weights in memory, the
fp16 GEMM's speed: the candidate form for large batches).

Forms ``nbits-<block>-sm80`` / ``-sm90``: symmetric MatMulNBits weights prepacked offline into the
fpA_intB (CUTLASS mixed-input GEMM) layout of Ampere / Hopper (``weight_prepacked`` 1 / 2, which
ONNX Runtime runs on that path unasked), packed by GenAI's builder's own packer
(``onnxruntime_genai/models/quantization/cuda_quantizer.py``, needs torch; loaded from the
installed GenAI wheel). Hopper's native layout takes block 64 / 128 only.

``--fpa-intb``: ONNX Runtime's fpA_intB (CUTLASS mixed-input GEMM and GEMV) path for MatMulNBits,
which it takes only when asked (``ORT_FPA_INTB_GEMM=1``, or the session option
``ep.cuda.fpa_intb_gemm`` in newer releases) and only for block 64 / 128 at fp16.

Each case: one session holding a chain of ``--chain`` identical linears (so per-run overhead
does not hide the kernel), inputs and outputs bound on the device, ``--iters`` runs after a
warm-up; the median per linear in microseconds and the weight bandwidth it implies. Random
weights: speed depends on shapes, not values.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import numpy as np
from onnx import TensorProto, helper, numpy_helper

SHAPES = {"q/k/v packed": (4096, 6144), "o": (4096, 4096), "gate/up packed": (4096, 28672), "down": (14336, 4096)}


def parse_form(form: str) -> tuple:
    """A ``--forms`` name -> (kind, block, zero points, folded at load): ``fp16``,
    ``nbits-<block>[-zp]`` (MatMulNBits), ``dq[-fold]-<block>`` (DequantizeLinear + MatMul, zero points)."""
    parts = form.split("-")
    block = next((int(x) for x in parts if x.isdigit()), 0)
    return parts[0], block, parts[0] == "dq" or "zp" in parts, "fold" in parts


def prepacked_arch(form: str) -> int:
    """80 / 90 for a ``-sm80`` / ``-sm90`` form (weights prepacked offline), else 0."""
    return next((int(x[2:]) for x in form.split("-") if x in ("sm80", "sm90")), 0)


def genai_packer():
    """GenAI's builder's fpA_intB weight packer, from the installed wheel (the file alone: the
    package's __init__ loads its native library)."""
    import importlib.util

    spec = importlib.util.find_spec("onnxruntime_genai")
    path = Path(list(spec.submodule_search_locations)[0]) / "models" / "quantization" / "cuda_quantizer.py"
    module_spec = importlib.util.spec_from_file_location("genai_cuda_quantizer", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module._pack_weights_for_cuda_mixed_gemm


def model(k: int, n: int, form: str, block: int, chain: int, rng, zero_points: bool = False, arch: int = 0) -> bytes:
    nodes, inits, x = [], [], "x"
    for i in range(chain):
        y = f"y{i}" if i < chain - 1 else "y"
        if form == "fp16":
            w = (rng.standard_normal((k, n)) * 0.02).astype(np.float16)
            inits.append(numpy_helper.from_array(w, f"w{i}"))
            nodes.append(helper.make_node("MatMul", [x, f"w{i}"], [f"m{i}"]))
        elif form in ("gemm", "gemmt", "fusedt"):  # the weight as [K, N] or transposed [N, K] (transB)
            shape = (k, n) if form == "gemm" else (n, k)
            inits.append(numpy_helper.from_array((rng.standard_normal(shape) * 0.02).astype(np.float16), f"w{i}"))
            op, domain = ("FusedMatMul", "com.microsoft") if form == "fusedt" else ("Gemm", "")
            nodes.append(helper.make_node(op, [x, f"w{i}"], [f"m{i}"], domain=domain, transB=int(form != "gemm")))
        elif form.startswith("splitk"):  # K split in S parts: S batched GEMVs, then their sum
            s_parts = int(form[6:].rstrip("t"))
            transposed = form.endswith("t")
            shape = (s_parts, n, k // s_parts) if transposed else (s_parts, k // s_parts, n)
            inits += [numpy_helper.from_array((rng.standard_normal(shape) * 0.02).astype(np.float16), f"w{i}"),
                      numpy_helper.from_array(np.array([-1, s_parts, k // s_parts], np.int64), f"sh{i}"),
                      numpy_helper.from_array(np.array([0], np.int64), f"ra{i}")]
            mm = (helper.make_node("FusedMatMul", [f"xt{i}", f"w{i}"], [f"p{i}"], domain="com.microsoft", transB=1)
                  if transposed else helper.make_node("MatMul", [f"xt{i}", f"w{i}"], [f"p{i}"]))
            nodes += [helper.make_node("Reshape", [x, f"sh{i}"], [f"xr{i}"]),
                      helper.make_node("Transpose", [f"xr{i}"], [f"xt{i}"], perm=[1, 0, 2]), mm,
                      helper.make_node("ReduceSum", [f"p{i}", f"ra{i}"], [f"m{i}"], keepdims=0)]
        elif form == "dq":  # the packages' portable weight form: 4-bit codes, DequantizeLinear, MatMul
            blocks = k // block
            inits += [helper.make_tensor(f"q{i}", TensorProto.UINT4, [k, n], rng.integers(0, 16, k * n).tolist()),
                      numpy_helper.from_array((rng.random((blocks, n)) * 0.01 + 0.001).astype(np.float16), f"s{i}"),
                      helper.make_tensor(f"z{i}", TensorProto.UINT4, [blocks, n], rng.integers(0, 16, blocks * n).tolist())]
            nodes += [helper.make_node("DequantizeLinear", [f"q{i}", f"s{i}", f"z{i}"], [f"w{i}"], axis=0, block_size=block),
                      helper.make_node("MatMul", [x, f"w{i}"], [f"m{i}"])]
        else:
            blocks = -(-k // block)
            q = rng.integers(0, 256, (n, blocks, block // 2), dtype=np.uint8)
            s = (rng.random((n * blocks,)) * 0.01 + 0.001).astype(np.float16)
            if arch:  # offline into the fpA_intB layout (symmetric: no zero points)
                q = np.asarray(genai_packer()(q.reshape(n, -1), n, k, 4, arch)).view(np.uint8).reshape(q.shape)
            inits += [numpy_helper.from_array(q, f"q{i}"), numpy_helper.from_array(s, f"s{i}")]
            ins = [x, f"q{i}", f"s{i}"]
            if zero_points:
                zp = rng.integers(0, 256, (n * ((blocks + 1) // 2),), dtype=np.uint8)
                inits.append(numpy_helper.from_array(zp, f"z{i}"))
                ins.append(f"z{i}")
            extra = {"weight_prepacked": {80: 1, 90: 2}[arch]} if arch else {}
            nodes.append(helper.make_node("MatMulNBits", ins, [f"m{i}"], domain="com.microsoft", K=k, N=n, bits=4,
                                          block_size=block, **extra))
        if i < chain - 1:  # back to width k for the next linear: take the first k columns
            inits.append(numpy_helper.from_array(np.array([0], np.int64), f"st{i}"))
            inits.append(numpy_helper.from_array(np.array([k], np.int64), f"en{i}"))
            inits.append(numpy_helper.from_array(np.array([1], np.int64), f"ax{i}"))
            if n >= k:
                nodes.append(helper.make_node("Slice", [f"m{i}", f"st{i}", f"en{i}", f"ax{i}"], [y]))
            else:
                nodes.append(helper.make_node("Concat", [f"m{i}"] * (-(-k // n)), [f"c{i}"], axis=1))
                nodes.append(helper.make_node("Slice", [f"c{i}", f"st{i}", f"en{i}", f"ax{i}"], [y]))
        else:
            nodes.append(helper.make_node("Identity", [f"m{i}"], [y]))
        x = y
    g = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT16, ["m", k])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT16, ["m", None])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    m.ir_version = 10
    return m.SerializeToString()


def time_case(ort, data: bytes, rows: int, k: int, iters: int, fpa_intb: bool = False, fold: bool = False) -> float:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if fpa_intb:
        so.add_session_config_entry("ep.cuda.fpa_intb_gemm", "1")
    if fold:  # constant folding then dequantizes DequantizeLinear of initializers at load: fp16 weights
        so.add_session_config_entry("session.disable_quant_qdq", "1")
    sess = ort.InferenceSession(data, so, providers=["CUDAExecutionProvider"])
    assert sess.get_providers()[0] == "CUDAExecutionProvider"
    x = ort.OrtValue.ortvalue_from_numpy(np.random.default_rng(0).standard_normal((rows, k)).astype(np.float16), "cuda", 0)
    b = sess.io_binding()
    b.bind_ortvalue_input("x", x)
    b.bind_output("y", "cuda")
    for _ in range(10):
        sess.run_with_iobinding(b)
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        sess.run_with_iobinding(b)
        b.synchronize_outputs()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    import onnxruntime as ort

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 16, 64, 256])
    ap.add_argument("--iters", type=int, default=100)
    ap.add_argument("--chain", type=int, default=8)
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES))
    ap.add_argument("--forms", nargs="+", default=["fp16", "nbits-32-zp", "nbits-32", "nbits-64", "nbits-128", "nbits-128-zp"])
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--fpa-intb", action="store_true")
    args = ap.parse_args()
    if args.fpa_intb:
        os.environ["ORT_FPA_INTB_GEMM"] = "1"  # read when a session makes its kernels
    rng = np.random.default_rng(20261203)
    lines = [f"onnxruntime {ort.__version__}; one linear's median us (chain of {args.chain}), fp16 activations; "
             f"fpA_intB {'asked for' if args.fpa_intb else 'off'}", "",
             "| linear (K x N) | form | " + " | ".join(f"{m} rows" for m in args.rows) + " |",
             "|---|---|" + "---|" * len(args.rows)]
    print("\n".join(lines), flush=True)
    for name in args.shapes:
        k, n = SHAPES[name]
        for form in args.forms:
            kind, block, zp, fold = parse_form(form)
            try:
                data = model(k, n, kind, block, args.chain, rng, zp, prepacked_arch(form))
                cells = [f"{time_case(ort, data, m, k, args.iters, args.fpa_intb, fold) / args.chain * 1e6:,.0f}"
                         for m in args.rows]
            except Exception as exc:  # noqa: BLE001 - a form ONNX Runtime refuses is a row saying so
                cells = [f"failed: {type(exc).__name__}: {str(exc)[:80]}"] + [""] * (len(args.rows) - 1)
            line = f"| {name} ({k} x {n}) | {form} | " + " | ".join(cells) + " |"
            lines.append(line)
            print(line, flush=True)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"gpu_nbits{'-fpa' if args.fpa_intb else ''}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
