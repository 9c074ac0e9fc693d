"""ONNX Runtime GenAI's continuous-batching Engine (``og.Engine``) over ``gpu_serving.py``'s request
stream (issue #21, item 4): N requests at once, driven from Python with the same token ids; its
paged KV pool set to the run's budget (``genai_blocks``); a level with no token for ``STALL_S`` is
stopped and reported where it stood."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from gpu_agent_export import say
from gpu_requests import SEED, WARM_TOKENS, brief, prompts, summarize

STALL_S = 60  # a level with no token for this long is stopped and reported


def genai_blocks(gen: Path, blocks: int) -> list:
    """Set every ``num_blocks`` in GenAI's config (its paged KV pool, in blocks) to ``blocks``, so one
    build serves budgets other than the one it was built with; the keys' paths, as changed."""
    path = gen / "genai_config.json"
    cfg = json.loads(path.read_text())
    found = []

    def walk(node, where):
        if isinstance(node, dict):
            for k, v in node.items():
                if k == "num_blocks" and isinstance(v, int):
                    node[k] = blocks
                    found.append(f"{where}.{k}: {v} -> {blocks}")
                else:
                    walk(v, f"{where}.{k}")
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, f"{where}[{i}]")

    walk(cfg, "")
    path.write_text(json.dumps(cfg, indent=4))
    return found


def genai_levels(gen: Path, levels: list, prompt: int, new: int, vocab: int, rows: dict,
                 kv_gib: float = float("nan"), warm: int = 4, blocks: int | None = None,
                 sampling: dict | None = None) -> None:
    """GenAI's Engine over the same prompts, each level once (round 1's prompts); see :func:`genai_runner`."""
    run = genai_runner(gen, prompt, new, vocab, kv_gib, warm, blocks, sampling)
    for n in levels:
        r = run(prompts(n, prompt, vocab, SEED))
        rows[("GenAI Engine (paged)", n)] = r
        say(f"  {time.strftime('%H:%M:%S')} genai {n}: {brief(r)}")


def genai_runner(gen: Path, prompt: int, new: int, vocab: int, kv_gib: float = float("nan"), warm: int = 4,
                 blocks: int | None = None, sampling: dict | None = None):
    """GenAI's Engine loaded and warmed up (``warm`` requests of ``WARM_TOKENS``); returns
    ``run(reqs, new=new)``, which drives one level (``reqs``: token-id prompts, all at once) and
    summarizes it. ``kv_gib``: its paged KV pool as configured (allocated whole at start;
    ``blocks``: set to that many blocks first); ``sampling``: temperature and top_p (request i
    seeded i), else greedy. Counts the requests decoding at once (a first token out, the turn not
    over)."""
    import onnxruntime_genai as og

    if blocks is not None:
        found = genai_blocks(gen, blocks)
        say(f"GenAI KV pool: {'; '.join(found) or 'no num_blocks in genai_config.json: its budget is not the same as ours'}")
    model = og.Model(str(gen))
    engine = og.Engine(model)
    caps = engine.get_capabilities()
    say(f"GenAI Engine: max batch {caps.configured_max_batch_size}, max scheduled tokens {caps.max_scheduled_tokens}")
    buf = engine.create_event_buffer(65536)
    token, failed = int(og.EngineEventFlags.TOKEN.value), int(og.EngineEventFlags.FAILED.value)
    over = int(og.EngineEventFlags.TURN_FINISHED.value)

    def run(reqs: list, new: int = new) -> dict:
        reqs = list(reqs)  # the caller's list stays as it was (its entries hold the requests here)
        t0 = time.perf_counter()
        sent, times, tokens, ids = {}, {}, {}, {}
        for i, p in enumerate(reqs):
            r = engine.create_request()
            opts = og.TurnOptions(r)
            opts.set_max_generated_tokens(new)
            opts.set_min_generated_tokens(new)
            if sampling:
                opts.set_do_sample(True)
                opts.set_temperature(sampling["temperature"])
                opts.set_top_p(sampling["top_p"])
                opts.set_seed(i)
            r.begin_turn(np.asarray(p, np.int32), opts)
            ids[id(r)], sent[i], times[i], tokens[i] = i, time.perf_counter() - t0, [], 0
            reqs[i] = r  # keep it alive
        errors, decoding, most, last, ended, closing = 0, set(), 0, time.perf_counter(), [], True
        while engine.has_pending_requests():
            if time.perf_counter() - last > STALL_S:  # no token for that long: report where it stood
                done = sum(1 for i in sent if tokens[i] >= new)
                say(f"  GenAI Engine stalled: no token for {STALL_S} s; {sum(tokens.values())} tokens, {done} of "
                    f"{len(sent)} requests done, {len(decoding)} decoding")
                errors += len(sent) - done
                break
            now = None
            for ev in engine.run(buf):
                i = ids.get(id(ev.request))
                if i is None:
                    continue
                flags = int(ev.flags.value)
                if flags & failed:
                    errors += 1
                if flags & token:  # the last token comes flagged TOKEN | TURN_FINISHED
                    now = now or time.perf_counter() - t0
                    last = t0 + now
                    times[i].append(now)
                    tokens[i] += 1
                    decoding.add(i)
                if flags & (over | failed):
                    decoding.discard(i)
                    ended.append(i)
            most = max(most, len(decoding))
            for i in ended if closing else ():  # a finished request holds its KV for another turn until closed
                try:
                    reqs[i].close()
                except Exception as exc:  # noqa: BLE001 - untested on 0.18 when written: said once, then run on
                    say(f"  GenAI request close failed (finished requests stay open): {type(exc).__name__}: {exc}")
                    closing = False
                    break
            ended.clear()
        return summarize([{"sent": sent[i], "times": times[i], "tokens": tokens[i],
                           "error": "failed" if not times[i] else None} for i in sent]) | {
            "genai_errors": errors, "running_max": most, "kv_gib": kv_gib}

    run(prompts(warm, prompt, vocab, seed=1), WARM_TOKENS)  # warm-up (--warm)
    return run
