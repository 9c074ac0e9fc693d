"""The serving KV budget when the operator gives none: on a GPU, what the device has left.

As vLLM's ``gpu_memory_utilization``: the server may use that share of the GPU's whole memory.
Of it, what is in use once the model is loaded (the weights, and whatever else runs on the card)
and what the forwards need besides the KV (:func:`working_bytes`) are taken off; the rest is the
KV budget, no more than ``max_batch`` requests of the whole context (or of ``max_model_len``) can
hold. The engine's warm-up runs every decode bucket and the largest prefill before the first
request, so a working-memory estimate that falls short fails at startup, not under load. On the
CPU (and where the device's memory cannot be read) the fixed default stays: KV lives in host
memory, which other work shares.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np

from portable_infer.engine.device_memory import cuda_memory
from portable_infer.engine.memory import bytes_per_token
from portable_infer.errors import InvalidArgumentError
from portable_infer.serving.scheduler_config import DEFAULT_GPU_MEMORY_UTILIZATION, SchedulerConfig
from portable_infer.serving.scheduler_plan import GROUP_CHUNKS

log = logging.getLogger("portable_infer.serving")

# Besides weights and KV, kept out of an automatic budget (working_bytes): cuBLAS's and cuDNN's
# workspaces, the companion sessions (device draws, row moves) and the arenas' slack, at least this
# much. Measured on the H200 at Llama-3.1-8B's shape, 256 rows, prefill chunks of 512: beyond the
# weights and the KV the server's device memory rose to 4.6 GiB (slots) and 3.5 GiB (paged KV)
# after 256 streams, where the terms below come to 1.5 GiB (docs/benchmarks.md, session 22)...
WORKSPACE_FLOOR = 3 << 30
# ...and per step, copies of the logits rows (the graph's output, the device draw's sorted and
# filtered rows, the rows brought over) ...
LOGIT_COPIES = 8
# ...and the live tensors of a layer per token a step carries, held twice: each decode bucket's
# CUDA graph keeps its own.
GRAPH_COPIES = 2


@dataclasses.dataclass(frozen=True)
class Budget:
    """How a budget was settled: ``tokens`` (None: the fixed default), and for an automatic one
    the device's ``free`` / ``total`` bytes when read and the ``working`` bytes kept aside."""

    tokens: int | None
    source: str  # "given" | "default" | "device"
    free: int = 0
    total: int = 0
    working: int = 0
    warm_used: int = 0  # bytes in use on the device once the KV and the warm-up's forwards hold theirs (0: unread)

    def describe(self) -> str:
        if self.source != "device":
            return ""
        gib = 1 << 30
        text = (f"from the device: {self.total / gib:.1f} GiB, {(self.total - self.free) / gib:.1f} in use after "
                f"loading, {self.working / gib:.1f} kept for the forwards")
        if self.warm_used:
            text += f"; {self.warm_used / gib:.1f} in use after the warm-up ({self.warm_used / self.total:.0%})"
        return text


def working_bytes(dims, kv, config: SchedulerConfig) -> int:
    """What the forwards need on the device besides weights and KV, an estimate (its floor
    measured: ``WORKSPACE_FLOOR``): a step carries ``max_batch`` decode rows and up to
    ``GROUP_CHUNKS`` prefill chunks."""
    item = np.dtype(kv.dtype).itemsize
    tokens = config.max_batch + GROUP_CHUNKS * config.prefill_chunk
    q, kv_width = dims.num_heads * dims.head_dim, dims.num_kv_heads * dims.head_dim
    per_token = (4 * dims.hidden_size + q + 2 * kv_width + 3 * dims.intermediate_size) * item
    logits = LOGIT_COPIES * config.max_batch * dims.vocab_size * 4
    return WORKSPACE_FLOOR + GRAPH_COPIES * tokens * per_token + logits


def settle(config: SchedulerConfig, model, memory=None) -> Budget:
    """The KV budget in tokens for ``config`` on ``model``'s engine. ``memory``: ``(free, total)``
    bytes (tests); default read from the engine's CUDA device."""
    engine = model.engine
    kv = engine.variant.kv
    if config.kv_budget_tokens is not None:
        return Budget(config.kv_budget_tokens, "given")
    if config.kv_budget_bytes is not None:
        return Budget(config.kv_budget_bytes // bytes_per_token(kv), "given")
    if engine.device != "cuda":
        if config.gpu_memory_utilization is not None:
            log.warning("gpu_memory_utilization applies on a GPU: the KV budget on %s is the fixed default; give "
                        "kv_budget_tokens to size it", engine.device)
        return Budget(None, "default")
    memory = memory or cuda_memory()
    if memory is None:
        log.warning("the GPU's free memory could not be read: the KV budget is the fixed default; "
                    "give kv_budget_tokens to size it")
        return Budget(None, "default")
    free, total = memory
    share = config.gpu_memory_utilization or DEFAULT_GPU_MEMORY_UTILIZATION
    working = working_bytes(model.manifest.model, kv, config)
    room = int(share * total) - (total - free) - working
    per_token = bytes_per_token(kv)
    if room < per_token * config.max_batch:
        gib = 1 << 30
        raise InvalidArgumentError(
            f"gpu_memory_utilization={share} of the GPU's {total / gib:.1f} GiB leaves no "
            f"room for KV: {(total - free) / gib:.1f} GiB are in use after loading the model and the forwards need "
            f"about {working / gib:.1f} GiB; raise gpu_memory_utilization, lower max_batch or prefill_chunk, "
            f"or give kv_budget_tokens")
    longest = min(model.max_context, config.max_model_len or model.max_context)  # what one request may hold
    return Budget(min(room // per_token, config.max_batch * longest), "device", free, total, working)


def after_warm_up(budget: Budget, memory=None) -> Budget:
    """``budget`` with what the device holds in use now, read once the KV is allocated and the
    warm-up has run (for the startup line: the operator sees the share really taken);
    ``memory``: ``(free, total)`` (tests). A budget not sized from the device stays as it is."""
    if budget.source != "device":
        return budget
    memory = memory or cuda_memory()
    if memory is None:
        return budget
    free, total = memory
    return dataclasses.replace(budget, warm_used=total - free)


def settled(config: SchedulerConfig, budget: Budget) -> SchedulerConfig:
    """``config`` with ``budget``'s tokens as its budget (the default stays unset)."""
    if budget.source == "given" or budget.tokens is None:
        return config
    return with_tokens(config, budget.tokens)


def with_tokens(config: SchedulerConfig, tokens: int) -> SchedulerConfig:
    """``config`` whose budget is ``tokens`` (the bytes or share that sized it spent)."""
    return dataclasses.replace(config, kv_budget_tokens=tokens, kv_budget_bytes=None, gpu_memory_utilization=None)
