"""The exact static graph's batched companion on the CPU: the same weights in fp32, for every
forward of more than one token.

ONNX Runtime's float-activation MatMulNBits (the exact graphs of a 4-bit package: a GGUF's own
blocks, or the exact twin of a float source's int4) is fastest at one row and slowest above it:
MLAS dequantizes each block and runs a GEMM, so a decode step of two rows takes about twice one
row's time (SmolLM2 on a Zen 4, 2 threads: 9.7 ms at one row, 19.2 at two, 47.7 at sixteen). A
package exported with the ``static-dense`` variant holds the static graph again with its 4-bit
layers as DequantizeLinear + MatMul over the portable graph's own blocks (no second copy on disk);
loaded with ``session.disable_quant_qdq`` ONNX Runtime folds those into fp32 MatMuls: the same
weights, exactly, at 4 bytes a weight of memory. The engine then runs its single-row decode steps
on the exact graph and every larger forward (a batch of rows, a prefill) on the companion
(:meth:`StaticEngine.attach_batched <portable_infer.engine.static.StaticEngine.attach_batched>`).

It is attached only where a batch above one is declared (``load(..., tune_batch=N)``, which
``serve`` passes as its ``--max-batch``), on the CPU, to the exact ``static`` graph, and where the
fp32 weights take at most half of the memory the process may still use (:func:`host.available_memory`).
``PORTABLE_INFER_DENSE=0`` turns it off.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

from portable_infer.engine import host
from portable_infer.package import manifest as mf
from portable_infer.package.variants import STATIC, STATIC_DENSE

logger = logging.getLogger(__name__)

BYTES_PER_WEIGHT = 4  # fp32
MEMORY_SHARE = 0.5  # the companion's weights may take at most this share of the available memory


def prepare(manifest: mf.Manifest, session_config, batch: int):
    """``session_config`` for every session of a load whose engine may get the companion: where
    the package has one and a batch above one is declared, the sessions' threads stop spinning
    when a run ends (ONNX Runtime's ``session.force_spinning_stop``; they still spin between a
    run's ops). Two sessions each with its own threads take turns on the same cores: spinning on
    after its run, one session's threads took the cores from the other's next run (on 2 cores one
    client's server lost ~5 % of its tok/s and ~20 ms of TTFT after each prefill on the companion)."""
    if not _wanted(batch) or not any(v.name == STATIC_DENSE for v in manifest.variants):
        return session_config
    return dataclasses.replace(session_config, spin_between_runs=False)


def _wanted(batch: int) -> bool:
    """A batch above one declared, and the companion not turned off (``PORTABLE_INFER_DENSE=0``)."""
    return batch > 1 and os.environ.get("PORTABLE_INFER_DENSE", "1") != "0"


def folded(so):
    """Session options ``so`` that let ONNX Runtime fold the companion's DequantizeLinear weights
    into fp32 initializers at load (it keeps DequantizeLinear nodes otherwise), for the runtime and
    for export's verification alike."""
    so.add_session_config_entry("session.disable_quant_qdq", "1")
    return so


def dense_bytes(dims: mf.ModelDims) -> int:
    """The companion's fp32 weights: every decoder linear and the lm_head table."""
    h, kv = dims.hidden_size, dims.num_kv_heads * dims.head_dim
    per_layer = h * (dims.num_heads * dims.head_dim + 2 * kv) + dims.num_heads * dims.head_dim * h \
        + 3 * h * dims.intermediate_size
    return BYTES_PER_WEIGHT * (dims.num_layers * per_layer + dims.vocab_size * h)


def companion(manifest: mf.Manifest, variant: mf.GraphVariant, device: str, batch: int) -> mf.GraphVariant | None:
    """The package's ``static-dense`` variant where it would serve ``variant`` (the exact
    ``static`` graph on the CPU, a declared batch above one), else None."""
    if not _wanted(batch) or device != "cpu" or variant.name != STATIC:
        return None
    return next((v for v in manifest.variants if v.name == STATIC_DENSE and v.precision == variant.precision), None)


def attach(engine, manifest: mf.Manifest, pkg: Path, session_config, ort, batch: int,
           available: int | None = None) -> bool:
    """Attach the companion to ``engine`` where :func:`companion` finds one and the memory holds
    it (``available``: bytes, default :func:`host.available_memory`); True when attached."""
    dense = companion(manifest, engine.variant, engine.device, batch)
    if dense is None:
        return False
    need = dense_bytes(manifest.model)
    available = host.available_memory() if available is None else available
    if available is None or need > MEMORY_SHARE * available:
        logger.info("batched forwards stay on %s: its fp32 companion would take %.0f MiB of %s available",
                    engine.variant.name, need / 2**20,
                    "unknown memory" if available is None else f"{available / 2**20:.0f} MiB")
        return False
    session = ort.InferenceSession(str(pkg / dense.file), folded(session_config.session_options(ort)),
                                   providers=["CPUExecutionProvider"])
    engine.attach_batched(session)
    logger.info("forwards of more than one token run on %s (fp32 weights, ~%.0f MiB); single-row steps on %s",
                dense.name, need / 2**20, engine.variant.name)
    return True
