"""Weights into the graph at the requested precision: dense float, or block-quantized.

Linear weights are stored transposed, ``[in, out]``, so ``y = x @ W`` is a plain MatMul and the
block-quantized form is ``DequantizeLinear(q, scale, zero, axis=0, block_size=32)`` (which ONNX
Runtime's CPU provider may fuse into MatMulNBits). An offset term (GGUF Q4_1: ``w = d*q + m``)
becomes an exact correction in the portable graph::

    y = x @ DQ(q, d)  +  blocksum(x) @ m        blocksum(x)[.., b] = sum of x over block b

The fused graphs fold it into the MatMulNBits itself (integer zero points, and the remainder as
4-bit rows that multiply the block sums: see ``weight_ops.WeightOps.augment``), except with fp16
activations, which keep the correction ops. The initializers and the ops that read them, in either
form, are written by ``weight_ops.WeightOps``; this module picks the tensor, precision and form.

Each source tensor is written once: the tied embedding and lm_head share initializers.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from onnx import TensorProto

from .graph import GraphBuilder
from .int4_fit import fit_int4
from .parallel import transposed
from .quant import BLOCK, Blocks, fitting_block, quantize
from .shared_weights import Handoff, SharedWeights
from .weight_ops import BlockWeight, DenseWeight, NBitsWeight, WeightOps

logger = logging.getLogger(__name__)

PRECISION_BITS = {"fp32": None, "fp16": None, "int8": 8, "int4": 4}
# Width of the -q4 graphs' Q4_1 layers (d*q + m; Q4_K has the same form). At 4 bits the fit into
# integer zero points is a second rounding: SmolLM2 agreed with its reference on 74.4 % of 636
# positions (round-to-nearest of the dequantized copy: 70.4 %). MatMulNBits' 8-bit form holds each
# block to ~d/32 and agreed on 95.6 % (static-int8, exact weights: 96.2 %): docs/benchmarks.md.
Q4_1_FIT_BITS = 8
# Float weights in the -q4 graphs: round-to-nearest (quant.quantize, the -int8 twins' own form).
# int4_fit's search lowered SmolLM2-shaped float weights' error 10 % below it yet agreed less with
# the reference (66.2 % against 67.1 % of 636 positions, perplexity +41 % against +35 %).
FLOAT_FIT = False


@dataclass(frozen=True)
class WeightForm:
    """How one graph stores its weights: the knobs of the linear lowering (``lowering/linear.py``)."""

    precision: str  # fp32 | fp16 | int8 | int4: the layers' width (PRECISION_BITS)
    activations: str = "fp32"  # fp32 | fp16: int4/int8 weights may run fp16 activations
    # MatMulNBits accuracy level of the layers (1 float, 4 int8 activations); None: the portable
    # DequantizeLinear + MatMul form
    nbits_accuracy: int | None = None
    head_accuracy: int | None = None  # of the lm_head and tied table (None: the layers')
    # the -q4 graphs: 4-bit layers in MatMulNBits' integer form (uint8 zero points, no correction
    # rows), fitted to the source blocks (int4_fit.fit_int4)
    int4_fit: bool = False
    block: int = BLOCK  # block size of float weights quantized here (source blocks keep theirs)
    symmetric: bool = False  # int4 quantized here without zero points (quant.quantize)
    # DequantizeLinear form only: Q4_1 offsets added to the dequantized weights (static-dense, which
    # ONNX Runtime folds into fp32 MatMuls at load) instead of multiplying the block sums of x
    offsets_in_weight: bool = False

    def quantize(self, w: np.ndarray, bits: int) -> Blocks:
        """Float [out, in] rows quantized here at ``bits``: in this form's blocks (narrower rows at
        the largest halving that divides them), int4 symmetric where the form says so."""
        return quantize(w, bits, fitting_block(w.shape[1], self.block), symmetric=self.symmetric)

    @property
    def dtype(self):
        """The activation (and KV) dtype."""
        return np.float16 if "fp16" in (self.precision, self.activations) else np.float32

    @property
    def onnx_dtype(self) -> int:
        return TensorProto.FLOAT16 if self.dtype == np.float16 else TensorProto.FLOAT

    @property
    def layer_bits(self) -> int | None:
        return PRECISION_BITS[self.precision]

    @property
    def table_bits(self) -> int | None:
        """Width of the embedding / lm_head table. It is large and quality-sensitive: 8 bits at
        int4/int8 with fp32 activations (CPU). With fp16 activations (GPU packages) it stays dense
        fp16: a GPU reads it in microseconds, while 8-bit MatMulNBits on CUDA dequantizes it every step."""
        return None if self.layer_bits is None or self.dtype == np.float16 else 8

    @property
    def table_accuracy(self) -> int | None:
        """MatMulNBits accuracy level of the lm_head and the tied table."""
        return self.head_accuracy or self.nbits_accuracy

    @property
    def split8(self) -> bool:
        """Exact 8-bit MatMulNBits matrices as two 4-bit halves (ORT's 8-bit kernel at accuracy 1 is slow)."""
        return self.table_accuracy == 1

    @property
    def fold_offsets(self) -> bool:
        """Q4_1 offsets folded into MatMulNBits as 4-bit remainder rows (within ~1/500 of a step, not
        exact) instead of the float correction ops (exact to fp32 rounding): only where the layers
        run int8 activations, which are not exact anyway and where the rows run faster than the
        ops. Float-activation graphs (the exact ones) and fp16 activations (CUDA, whose launches
        CUDA graphs absorb) keep the ops."""
        return self.dtype == np.float32 and self.nbits_accuracy not in (None, 1)


class WeightStore:
    """Fetches source tensors, converts them to the graph's form (:class:`WeightForm`) and emits
    them as typed records (``weight_ops``)."""

    def __init__(self, g: GraphBuilder, source, form: WeightForm, transposed: bool = False,
                 shared: SharedWeights | None = None, handoff: Handoff | None = None):
        self.g = g
        self.source = source
        self.form = form
        self.dtype = form.dtype
        self.onnx_dtype = form.onnx_dtype
        self.ops = WeightOps(g, self.dtype, self.onnx_dtype)  # initializers and the ops over them
        self.transposed = transposed  # GPT-2 Conv1D: source stores [in, out]
        self._emitted: dict[str, DenseWeight | BlockWeight | NBitsWeight] = {}
        self._stacked: dict[str, object] = {}  # virtual tensors: row-stacked source matrices
        # MatMulNBits weights emitted once for the graphs of one data file (shared_weights.py);
        # for the -q4 graphs an int4_fit.FitCache, which also counts the fit's error
        self.shared = shared
        self.fit_cache = shared if form.int4_fit else None
        self.handoff = handoff  # float weights rounded once for this graph and one built beside it

    def stack(self, names: list[str], key: str) -> str | None:
        """Register the row-wise stack of [out, in] weights (or of biases) under ``key``, so one
        matmul computes q/k/v or gate/up; None when their storage formats differ. Where an earlier
        graph of the shared data file decided it, the parts are read only if this graph needs them
        (it does not when that graph emitted the stack already)."""
        known = None if self.shared is None else self.shared.stacks.get(key)
        if known is None:
            # parts the graph built beside this one rounded already are float: read (taken) on use
            w = tuple(names) if self.handoff is not None and self.handoff.holds(names) else self._concat(names)
            known = w is not None
            if self.shared is not None:
                self.shared.stacks[key] = known
            if known:
                self._stacked[key] = w
        elif known:
            self._stacked[key] = lambda: self._concat(names)
        return key if known else None

    def _concat(self, names: list[str]):
        parts = [self._matrix(n) for n in names]
        if all(isinstance(p, Blocks) for p in parts):
            return Blocks.concat_rows(parts)
        if not any(isinstance(p, Blocks) for p in parts):
            return tuple(parts)  # float parts stay apart until a use joins them (_rows, _matrix)
        return None

    # --- small float tensors (norms, biases) --------------------------------------------------
    def vector(self, name: str, dtype=None, add: float = 0.0) -> str:
        w = self._dense(self._matrix(name)) + np.float32(add)
        return self.g.weight(_init_name(name, "f" if add == 0 else "f1"), w.astype(dtype or self.dtype))

    # --- records ------------------------------------------------------------------------------
    def nbits(self, name: str, bits: int, fit_table: bool = False) -> NBitsWeight:
        """The weight ``name`` in MatMulNBits layout at ``bits``, emitted once (``bits`` 8 also holds
        4-bit blocks, so the tied embedding gathers rows from the lm_head's initializers).
        ``fit_table``: an 8-bit source table fitted to 4 bits all the same (the int4 lm_head forms)."""
        key = f"{name}#nbits{bits}"
        if key not in self._emitted:
            make = lambda: self._emit_nbits(name, bits, fit_table)  # noqa: E731
            if self.shared is None:
                self._emitted[key] = make()
            else:  # converted (-q4: fitted) once per export
                record, reused = self.shared.emit(self.g, key, make)
                if reused:
                    self._stacked.pop(name, None)  # the stacked source matrix is not needed again
                self._emitted[key] = record
        return self._emitted[key]

    def _emit_nbits(self, name: str, bits: int, fit_table: bool) -> NBitsWeight:
        # the table at the other width took the plain name (a fitted one never does: below), so
        # a name does not depend on which graph of a shared data file emitted the other one
        twin = self._emitted.get(f"{name}#nbits{12 - bits}")
        twin = twin is not None and twin.B.startswith(_init_name(name, "nbits") + ".")
        if (self.form.int4_fit or fit_table) and bits == 4:
            w = self._fitted(name, fit_table)
        else:
            w = self._quantized(name, bits)
            if not isinstance(w, Blocks):  # raises: the input size is not a multiple of the block
                w = self.form.quantize(_joined(w), bits)
        # a fitted table is named by its width: the 8-bit one of an untied head may share its data file
        return self.ops.emit_nbits(_init_name(name, f"nbits{bits}" if twin or fit_table else "nbits"), w, bits,
                                   self.form.split8, self.form.fold_offsets)

    def _fitted(self, name: str, fit_table: bool) -> Blocks:
        """Every 4-bit linear of a -q4 graph (and a ``fit_table``) in MatMulNBits' integer form;
        exact 8-bit GGUF blocks (Q5_x, Q6_K, Q8_0) stay 8-bit layers there: fitting them to 4 bits
        would round them a second time (gguf_blocks.py)."""
        w = self._matrix(name)
        eight = isinstance(w, Blocks) and w.bits == 8
        if eight and not fit_table:
            return w
        source = w.dequantize() if eight else w
        del w  # the float source goes as soon as it is fitted
        if isinstance(source, Blocks):  # at the source's own block
            fitted = fit_int4(source, bits=Q4_1_FIT_BITS if source.kind == "q4_1" else 4)
        elif FLOAT_FIT:
            fitted = fit_int4(source, fitting_block(source.shape[1], self.form.block))
        else:
            fitted = self.form.quantize(source, 4)
        if self.fit_cache is not None and not fit_table:  # the layers' fit (the manifest names the head's form)
            self.fit_cache.add(source, fitted)
        return fitted

    def blocks(self, name: str, bits: int | None, packed4: bool = True,
               table: bool = False) -> DenseWeight | BlockWeight:
        """The weight ``name`` for DequantizeLinear + MatMul at ``bits`` (None: dense float),
        emitted once; ``table``: an embedding table (GPT-2 stores those untransposed)."""
        if name not in self._emitted:
            make = lambda: self._emit_blocks(name, bits, packed4, table)  # noqa: E731
            if self.shared is None:
                self._emitted[name] = make()
            else:  # converted once for the graphs of one data file, as nbits()
                key = f"{name}#blocks{bits}:{int(packed4)}{int(table)}:{np.dtype(self.dtype).name}"
                self._emitted[name], reused = self.shared.emit(self.g, key, make)
                if reused:
                    self._stacked.pop(name, None)
        return self._emitted[name]

    def _emit_blocks(self, name: str, bits: int | None, packed4: bool, table: bool) -> DenseWeight | BlockWeight:
        w = self._rows(name, table) if bits is None else self._quantized(name, bits, table)
        if isinstance(w, Blocks):
            return self.ops.emit_blocks(_init_name(name, ""), w, packed4)
        n_in = w[0].shape[1]
        if bits is not None:
            logger.info("%s: input size %d is not a multiple of %d, kept in float", name, n_in, BLOCK)
        dense = [p.dequantize() if isinstance(p, Blocks) else p for p in w]  # transposed and cast in one pass
        return DenseWeight(self.g.weight(_init_name(name, "T"), transposed(dense, self.dtype)), n_in)

    def _quantized(self, name: str, bits: int, table: bool = False) -> Blocks | tuple:
        """``name`` at ``bits``: source blocks as they are, float row parts rounded to nearest each
        alone (the rounding is per row: the values of their stack, without joining the float rows),
        or the row parts as read when their input size is not a multiple of the block. A part that
        the graph built beside this one rounded already is taken from the handoff, not read again."""
        parts, out = self._parts(name), []
        for p in parts:
            named = isinstance(p, str) and self.handoff is not None
            key = (p, bits, self.form.block, self.form.symmetric, self._flips(p, table)) if named else None
            b = self.handoff.take(key) if key else None
            if b is None:
                w = self._load(p, table)
                block = fitting_block(w.shape[1], self.form.block)
                if w.shape[1] % block:  # the parts share their input size: the first one tells
                    return (w, *(self._load(q, table) for q in parts[1:]))
                b = w if isinstance(w, Blocks) else self.form.quantize(w, bits)
                if key and b is not w:
                    self.handoff.leave(key, b)
            out.append(b)
        return out[0] if len(out) == 1 else Blocks.concat_rows(out)

    # --- embeddings ---------------------------------------------------------------------------
    def embedding(self, ids: str, name: str, bits: int | None) -> str:
        """Rows of the [vocab, hidden] table for ``ids`` [B, S] -> [B, S, hidden].

        The table is stored transposed (as the tied lm_head wants it), so rows are gathered
        along axis 1 and dequantized block-wise after the gather.
        """
        if self.form.nbits_accuracy is not None and bits is not None:  # the lm_head's MatMulNBits table: stored once
            return self.ops.nbits_rows(ids, self.nbits(name, 8))
        return self.ops.dequant_rows(ids, self.blocks(name, bits, packed4=False, table=True))

    # --- conversion ---------------------------------------------------------------------------
    def _dense(self, w) -> np.ndarray:
        return w.dequantize() if isinstance(w, Blocks) else np.asarray(w, dtype=np.float32)

    def _matrix(self, name: str, table: bool = False):
        """A source matrix in HF Linear layout [out, in] (a stack's float parts joined)."""
        return _joined(self._rows(name, table))

    def _rows(self, name: str, table: bool = False) -> tuple:
        """A source matrix in HF Linear layout [out, in], as row parts (a stack's, or the one matrix)."""
        return tuple(self._load(p, table) for p in self._parts(name))

    def _parts(self, name: str) -> tuple:
        """What ``name`` stands for, as row parts: a stack's parts (tensor names, read on use, or
        values read already; a stack of source blocks is one joined value), else the one tensor."""
        if name in self._stacked:
            w = self._stacked.pop(name)
            w = w() if callable(w) else w  # a stack an earlier graph decided (see stack)
            return w if isinstance(w, tuple) else (w,)
        return (name,)

    def _load(self, part, table: bool = False):
        """A part as the source holds it, in HF Linear layout [out, in] (a tensor name is read here).
        GPT-2's Conv1D linears are stored [in, out]; its embedding tables (wte, tied to the
        lm_head, and wpe) are [rows, hidden]."""
        if not isinstance(part, str):
            return part
        w = self.source.get(part)
        return w.T if self._flips(part, table) and not isinstance(w, Blocks) and w.ndim == 2 else w

    def _flips(self, name: str, table: bool) -> bool:
        """Whether the float matrix ``name`` is stored [in, out] (GPT-2's Conv1D linears)."""
        return self.transposed and not table and "wte" not in name


def _joined(parts: tuple):
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def _init_name(hf_name: str, suffix: str) -> str:
    return hf_name.removesuffix(".weight").removesuffix(".bias") + ("." + suffix if suffix else "") + (
        ".bias" if hf_name.endswith(".bias") else "")
