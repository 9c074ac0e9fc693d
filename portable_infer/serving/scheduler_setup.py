"""What both schedulers set up the same way: the KV budget in blocks, the running batch for an
engine (restacked, fixed slots, or paged), and a request's checks at submission.

``Scheduler`` (in-process) and ``ProcessScheduler`` (``serve --engine-process``, the request
checks on the API side) call these; the rules live here once.
"""

from __future__ import annotations

from portable_infer.decode.generate import check_prompt
from portable_infer.decode.sampling import SamplingParams
from portable_infer.decode.sequence import Sequence
from portable_infer.engine.memory import bytes_per_token
from portable_infer.engine.paged import BLOCK_SIZE, block_size_for
from portable_infer.errors import ContextLengthError, InvalidArgumentError
from portable_infer.serving.kv_demand import admission_blocks
from portable_infer.serving.kvblocks import BlockPool
from portable_infer.serving.paged_batch import PagedBatch
from portable_infer.serving.scheduler_plan import GROUP_CHUNKS
from portable_infer.serving.running_batch import RunningBatch
from portable_infer.serving.scheduler_config import DEFAULT_KV_BUDGET_BYTES, SchedulerConfig
from portable_infer.serving.slot_batch import SlotBatch
from portable_infer.text.prompts import token_ids

def kv_pool(config: SchedulerConfig, kv, device: str) -> BlockPool:
    """The KV budget of ``config`` (tokens, or bytes of the graph's ``kv`` layout) in blocks of
    ``config.block_size`` tokens (None: 16, or what a paged pool's blocks hold on ``device``: the
    budget's blocks are the pool's, so that what admission counts is what the pool holds)."""
    block = config.block_size or (block_size_for(device) if kv.growth == "paged" else BLOCK_SIZE)
    budget = config.kv_budget_tokens or (config.kv_budget_bytes or DEFAULT_KV_BUDGET_BYTES) // bytes_per_token(kv)
    return BlockPool(budget // block, block)


def budget_line(stats, max_context: int, row_limit: int | None = None, note: str = "", slots: bool = True) -> str:
    """What a server's KV budget holds, for its operator at startup (``stats``: the scheduler's
    :class:`SchedulerStats`): its tokens and blocks, how many requests of the whole context fit at
    once, and the most one request may hold (``row_limit``): with ``slots`` the length of the
    running batch's slots, else ``max_model_len``; ``note``: how an automatic budget was sized
    (``kv_budget.Budget.describe``)."""
    tokens = stats.blocks_total * stats.block_size
    line = (f"KV budget: {tokens:,} tokens ({stats.blocks_total:,} blocks of {stats.block_size}): "
            f"{tokens // max_context:,} requests of the whole context ({max_context:,} tokens) at once")
    if row_limit is not None and slots:
        line += (f"; {stats.max_batch} slots of {row_limit:,} tokens: a request's prompt + max_tokens must fit one "
                 f"(a decode step reads the slots whole: --max-model-len bounds them)")
    elif row_limit is not None:
        line += f"; a request's prompt + max_tokens may hold {row_limit:,} tokens (max_model_len)"
    sizing = f"{note}; " if note else ""
    return line + f" ({sizing}--kv-budget-tokens sets it)"


def slot_rows(engine, config: SchedulerConfig) -> bool:
    """The running batch is fixed slots (SlotBatch: a row that leaves frees its slot, nothing moves):
    static-KV graphs where ``config.slot_batch`` says so (None: off the CPU, where a free slot's
    compute is not free)."""
    slots = config.slot_batch if config.slot_batch is not None else engine.device != "cpu"
    return bool(slots) and engine.variant.kv.growth == "static"


def max_model_len(given: int | None, max_prompt_tokens: int | None, max_new_tokens: int | None) -> int | None:
    """The most KV tokens one request may hold on a server (``SchedulerConfig.max_model_len``):
    ``given``, else where the server caps both a prompt and its max_tokens, their sum (no request
    can hold more, so no slot needs to); else None (the context)."""
    if given is not None:
        return given
    if max_prompt_tokens is not None and max_new_tokens is not None:
        return max_prompt_tokens + max_new_tokens
    return None


def row_limit(engine, config: SchedulerConfig, pool: BlockPool, max_context: int) -> int | None:
    """KV tokens one request may hold (prompt and max_new_tokens; None: the context,
    ``max_context``): ``config.max_model_len`` where given, and where the batch is slots no more
    than a slot's share of the KV budget (the slots are ``max_batch`` equal rows of one buffer,
    which the budget bounds) nor than the context. A ``max_model_len`` over the context, and a
    budget too small for a slot of two tokens, are refused."""
    limit = config.max_model_len
    if limit is not None and limit > max_context:
        raise InvalidArgumentError(f"max_model_len={limit} (serve: --max-model-len, else --max-prompt-tokens + "
                                   f"--max-new-tokens) is over the model's context ({max_context} tokens); give at "
                                   f"most {max_context} in all (serve: --max-model-len {max_context} keeps both caps)")
    if not slot_rows(engine, config):
        return limit
    share = pool.total * pool.block_size // config.max_batch
    if share < 2:
        raise InvalidArgumentError(
            f"the KV budget ({pool.total * pool.block_size} tokens) leaves each of max_batch={config.max_batch} "
            f"slots {share} tokens; raise kv_budget_tokens (or kv_budget_bytes) or lower max_batch")
    return min(share, limit or max_context)


def running_batch(engine, config: SchedulerConfig, prefixes, max_context: int, limit: int | None = None,
                  pool: BlockPool | None = None):
    """The running batch for ``engine``: on paged KV, rows by block tables over a pool of the KV
    budget (``pool``'s blocks), prefills riding in decode forwards (:class:`PagedBatch`); slots
    (:func:`slot_rows`; rows of at most ``limit`` tokens); else restacked at each join and leave.
    Restacked static KV off the CPU keeps finished rows, masked, until half the batch has
    finished or a request joins (the planner's ``defer_leave``): moving the rest copies their KV,
    each batch size captures a CUDA graph, and an idle row costs a GPU step next to nothing."""
    prefill = GROUP_CHUNKS * config.prefill_chunk  # the most prompt tokens one step prefills
    if engine.variant.kv.growth == "paged":
        batch = PagedBatch(engine, prefixes, max_context)
        if pool is not None:
            engine.reserve(pool.total, pool.block_size)
            if engine.device != "cpu":  # before the first request, as vLLM does
                batch.warm_up(config.max_batch, prefill)
        return batch
    if slot_rows(engine, config):
        batch = SlotBatch(engine, prefixes, max_context, config.max_batch, limit)
        if getattr(engine, "cuda_graph", False):  # before the first request, as vLLM does
            batch.warm_up(prefill)
        return batch
    return RunningBatch(engine, prefixes, max_context)


def checked_request(model, pool: BlockPool, ids: list, params: SamplingParams, truncate: bool,
                    limit: int | None = None, on_demand: bool = False) -> tuple:
    """``(ids, blocks, sequence)`` of a request that passes the checks at submission (any thread),
    else the typed error: the prompt (ids in the vocabulary, within the context, or cut with
    ``truncate``), its KV blocks within the whole budget, its sampling state (a bad schema or
    grammar, or a logit bias outside the vocabulary, fails here: a 400). ``blocks``: what it
    reserves at admission: its prompt and ``max_new_tokens``, or with ``on_demand`` (paged KV)
    its prompt's and first token's (:mod:`~portable_infer.serving.kv_demand`)."""
    codec = model.codec
    if not isinstance(params, SamplingParams):
        raise InvalidArgumentError(f"params must be a SamplingParams, got {type(params).__name__}")
    if params.stop:
        codec.require_tokenizer()  # stop strings are matched on text
    ids = check_prompt(token_ids(ids, codec.vocab_size), model.max_context, truncate)
    need = min(len(ids) + params.max_new_tokens, model.max_context)  # KV tokens it may hold
    blocks = pool.blocks_for(need)
    if blocks > pool.total:
        raise ContextLengthError(
            f"the request needs {blocks} KV blocks ({len(ids)} prompt + {params.max_new_tokens} new tokens) "
            f"but the whole budget is {pool.total}; lower max_new_tokens or raise kv_budget_tokens",
            param="max_new_tokens")
    if limit is not None and need > limit:
        raise ContextLengthError(
            f"the request needs {need} KV tokens ({len(ids)} prompt + {params.max_new_tokens} new) but one request "
            f"may hold {limit} here (max_model_len, or where the running batch is slots of one buffer, the KV "
            f"budget ({pool.total * pool.block_size} tokens) over max_batch rows); lower max_new_tokens, or raise "
            f"max_model_len or kv_budget_tokens, or lower max_batch", param="max_new_tokens")
    seq = Sequence(ids, params, eos_ids=codec.eos_ids, vocab_size=codec.vocab_size,
                   guide=model.guide if params.constraint is not None else None)
    return ids, admission_blocks(pool, len(ids)) if on_demand else blocks, seq
