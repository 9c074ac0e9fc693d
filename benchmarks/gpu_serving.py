"""GPU serving at scale (issue #21): our server against ONNX Runtime GenAI's continuous-batching Engine,
same model, same request stream, one run.

    source benchmarks/gpu_setup.sh .gpu/cN   # on the GPU machine: the staged wheels installed, PATH and PYTHONPATH
    PYTHONPATH=/root/site:$PWD python3 benchmarks/gpu_serving.py --assets DIR --out $OUT \\
        --parts make export genai serve engine steps [--levels 64 256] [--prompt 128] [--new 256]
        [--configs inproc engine inproc-restack engine-restack] [--shape 8b|3b] [--precisions fp16 int4]
        [--rounds K] [--paired]

``make``: a random-weight HF folder of Llama-3.1-8B's shape (``--shape 3b``: Llama-3.2-3B's, a
stand-in named as such), fp16, built on the GPU (``gpu_agent_export.make_hf``; the tokenizer from
``--assets``: decode speed depends on shapes, not values). ``export``: ours,
``--precision fp16 --activations fp16 --variants static --no-verify`` (``--precisions int4``: also, or
instead, ``--precision int4 --activations fp16``, served the same way; issue #21's target: int4 at
256 streams no slower than fp16; GenAI stays fp16). ``genai``: GenAI 0.18's
builder with ``use_paged_attention=true`` (its Engine's paged KV) and the same KV budget as ours:
``--new + --prompt`` tokens for each of the largest level's sequences.

``paged-steps``: the paged engine's decode steps plain and as CUDA graphs (``gpu_paged_steps.py
--graphs``), batch 1, 50 (padded to 64) and each level. ``steps``: the engine alone on this machine (``gpu_batch_steps.py --mix NEW``: decode steps at
batch 1 and each level, the rows holding the levels' range of contexts), for the server's step
clock to be read against on the same machine. ``serve``: ``portable-infer serve`` on CUDA per ``--configs`` (``inproc``: the scheduler in the
server's process; ``engine``: ``--engine-process``; ``-restack``: with ``--slot-batch off``, the
batch restacked at each join and leave as before the slot batch; ``paged`` / ``engine-paged``:
``--paged-kv``, the package exported with the paged variant too (``+bsN``: ``--kv-block-size N``; ``+auto``: no
``--kv-budget-tokens``, the server sizes its KV budget from the GPU's memory, and nvidia-smi's figures are printed;
``+guF``: with it, ``--gpu-memory-utilization F``; ``+mml``: ``--max-model-len`` of ``--prompt + --new``, which bounds
the slots under an automatic budget); ``+siMS``: an experiment, every
Python process of the server switching threads every MS ms, ``sys.setswitchinterval`` (the engine process's own
choice, ``engine_core.switch_interval``, overridden: ``+si5`` is Python's default everywhere);
``+probe``: the engine process's decode steps timed in parts (``step_probe.py``: written to
``$OUT/probe-CONFIG.json``);
``+NAME=VALUE``: the server run with that environment variable, e.g. ``engine+ORT_ENABLE_XQA=0``), ``--max-batch`` the largest level, the KV
budget above; then each level: N streaming completions at once (``--prompt`` random token ids,
``--new`` tokens, greedy or ``--temperature``/``--top-p`` with request i seeded i, ignore_eos), read by client processes (a Python client parsing every
SSE chunk is itself a core's work at these rates). ``engine``: GenAI's ``og.Engine`` driven from
Python with the same token ids, N requests at once. ``transformers``: transformers' own continuous
batching (``generate_batch``, paged attention) on the HF folder, the same prompts and KV budget, in
a process of its own (``gpu_hf_batching.py``). Round k of a level draws fresh prompts (seed SEED +
k - 1; GenAI's and transformers' single round: SEED). ``--paired``: GenAI's Engine is loaded in this
process before our servers start and runs each of our rounds' levels on the same prompts, right
after ours in rounds 1, 3, ... and right before it in rounds 2, 4, ...; a table gives each round's
ratio and, per config and level, their median, min, max and the rounds at 1.2x (``paired_rounds``):
a drift of the machine between rounds then hits both rows of a round alike. ``--budget-streams K``: everyone's KV budget is K
whole requests (default: the largest level); below the largest level the table's "running at
once" is item 4's measure of how many sequences each runtime admits in the same KV memory (the
slots hold whole requests: their ``--max-batch`` is K). Per row: generated tok/s (completion tokens /
the level's wall time), TTFT p50/p99, inter-chunk p99, errors, the server's CPU cores (its
process tree's CPU seconds / wall), the KV bytes its metrics reported at most. Printed and written
to ``$OUT/gpu_serving.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_agent_export import LINES, LLAMA8B, make_hf, say, timed  # noqa: E402
from gpu_genai_engine import genai_levels, genai_runner  # noqa: E402
from gpu_requests import SEED, WARM_TOKENS, brief, prompts, summarize  # noqa: E402

LLAMA3B = dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
               num_key_value_heads=8, head_dim=128, vocab_size=128256, max_position_embeddings=8192,
               rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
SHAPES = {"8b": LLAMA8B, "3b": LLAMA3B}
CLIENT_PROCS = 8


# --- the HTTP clients (child processes) ------------------------------------------------------------
async def _stream(client, url: str, i: int, ids: list, new: int, t0: float, sampling: dict) -> dict:
    body = {"model": "m", "prompt": ids, "max_tokens": new, "stream": True, "temperature": 0,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    if sampling:  # --temperature: request i samples with seed i
        body.update(sampling, seed=i)
    sent = time.perf_counter()
    times, tokens, error = [], 0, None
    try:
        async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
            if r.status_code != 200:
                return {"error": f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"}
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                if chunk.get("choices"):
                    times.append(time.perf_counter())
    except Exception as exc:  # noqa: BLE001 - counted as an error of the level
        error = f"{type(exc).__name__}: {exc}"
    return {"sent": sent - t0, "times": [t - t0 for t in times], "tokens": tokens, "error": error}


def _client_proc(url: str, jobs: list, new: int, start_at: float, out, sampling: dict) -> None:
    import httpx

    async def main():
        limits = httpx.Limits(max_connections=len(jobs) + 4, max_keepalive_connections=len(jobs) + 4)
        async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as client:
            while time.time() < start_at:
                await asyncio.sleep(0.001)
            t0 = time.perf_counter() - (time.time() - start_at)
            return await asyncio.gather(*(_stream(client, url, i, ids, new, t0, sampling) for i, ids in jobs))

    out.put(asyncio.run(main()))


def http_level(url: str, reqs: list, new: int, at_start=None, sampling: dict | None = None) -> dict:
    """N streaming requests from client processes that start together; ``at_start()`` is called
    here when they do (readings of the server taken then exclude the clients' start-up);
    ``sampling``: their temperature and top_p (request i: seed i), else greedy."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    start_at = time.time() + 3.0  # every client process connected and waiting
    jobs = list(enumerate(reqs))
    shares = [jobs[i::CLIENT_PROCS] for i in range(CLIENT_PROCS)]
    procs = [ctx.Process(target=_client_proc, args=(url, s, new, start_at, q, sampling or {})) for s in shares if s]
    for p in procs:
        p.start()
    if at_start is not None:
        time.sleep(max(0.0, start_at - time.time()))
        at_start()
    results = [r for _ in procs for r in q.get()]
    for p in procs:
        p.join()
    return summarize(results)


# --- our server ------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tree_cpu_s(pid: int) -> float:
    """CPU seconds of ``pid`` and its children (from /proc)."""
    total = 0.0
    tick = os.sysconf("SC_CLK_TCK")
    pids = [pid]
    try:
        kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        pids += [int(k) for k in kids]
    except OSError:
        pass
    for p in pids:
        try:
            f = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(f[11]) + int(f[12])) / tick
        except (OSError, IndexError):
            pass
    return total


STEP_LINES = ("portable_infer_engine_seconds_total", "portable_infer_engine_steps_total",
              "portable_infer_decode_rows_total", "portable_infer_requests_preempted_total",
              "portable_infer_prefix_cache_hits_total")


def step_clock(url: str) -> dict:
    """The server's step-loop counters (/metrics: engine seconds by phase and part, steps, rows)."""
    import httpx

    try:
        text = httpx.get(f"{url}/metrics", timeout=5).text
    except Exception:  # noqa: BLE001
        return {}
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if line.startswith(STEP_LINES)}


def step_summary(before: dict, after: dict, wall: float) -> dict:
    """One level's step loop: decode steps, mean rows a step, ms a decode step waiting on the
    forward and on the host, prefill steps and seconds, plan and idle seconds, of ``wall``."""
    d = {k: after.get(k, 0.0) - v for k, v in before.items()}

    def sec(phase, part=""):
        return d.get(f'portable_infer_engine_seconds_total{{part="{part}",phase="{phase}"}}', float("nan"))

    steps = d.get('portable_infer_engine_steps_total{phase="decode"}', float("nan"))
    per = 1e3 / steps if steps else float("nan")
    return {"decode_steps": steps, "rows": d.get("portable_infer_decode_rows_total", float("nan")) / steps if steps else float("nan"),
            "decode_forward_ms": sec("decode", "forward") * per, "decode_host_ms": sec("decode", "host") * per,
            "prefill_steps": d.get('portable_infer_engine_steps_total{phase="prefill"}', float("nan")),
            "prefill_forward_s": sec("prefill", "forward"), "prefill_host_s": sec("prefill", "host"),
            "plan_s": sec("plan"), "idle_s": sec("idle"), "wall_s": wall,
            "preempted": d.get("portable_infer_requests_preempted_total", float("nan")),
            "prefix_hits": d.get("portable_infer_prefix_cache_hits_total", float("nan"))}


def server_gauges(url: str) -> tuple:
    """(KV bytes in use, requests running) from the server's /metrics (NaN where unread)."""
    import httpx

    try:
        text = httpx.get(f"{url}/metrics", timeout=5).text
    except Exception:  # noqa: BLE001
        return float("nan"), float("nan")
    values = {line.split()[0]: float(line.split()[-1]) for line in text.splitlines()
              if line.startswith(("portable_infer_kv_cache_bytes ", "portable_infer_requests_running "))}
    return (values.get("portable_infer_kv_cache_bytes", float("nan")),
            values.get("portable_infer_requests_running", float("nan")))


def gpu_memory() -> str:
    """The GPU's memory in use and total as nvidia-smi reports it (the whole device)."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
        return out.stdout.strip() or out.stderr.strip()
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"nvidia-smi: {exc}"


def serve_levels(pkg: Path, config: str, levels: list, prompt: int, new: int, vocab: int, rows: dict,
                 provider: str = "cuda", rounds: int = 1, prefill_chunk: int = 512, warm: int = 4,
                 budget: int | None = None, sampling: dict | None = None, pair=None, pairs: list | None = None) -> None:
    """Our server on ``pkg`` as ``config`` says, each level ``rounds`` times (round k: prompts of seed
    SEED + k); rows into ``rows``. ``pair(reqs)`` (``--paired``): GenAI's level on the same prompts,
    run right after ours in odd rounds and right before it in even ones, each pair of rows into
    ``pairs`` (:func:`paired_rounds`)."""
    import httpx

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    budget = budget or max(levels) * (prompt + new)
    base, *extras = config.split(",")[0].split("+")
    auto = "auto" in extras  # +auto: no budget given; the server sizes it from the GPU's memory
    max_batch = max(levels)
    if not base.endswith(("paged", "restack")) and not auto:  # slots: each holds a whole request, as many as the budget has
        max_batch = min(max_batch, budget // (prompt + new))
    cmd = [sys.executable, "-m", "portable_infer.cli", "serve", "--model", str(pkg), "--provider", provider, "--strict",
           "--port", str(port), "--max-batch", str(max_batch), "--max-waiting", str(4 * max(levels)),
           "--prefill-chunk", str(prefill_chunk), "--model-name", "m"] + ([] if auto else ["--kv-budget-tokens", str(budget)])
    switch = next((x[2:] for x in extras if x.startswith("si") and "=" not in x), "")
    cmd += ["--engine-process", "on" if base in ("engine", "engine-restack", "engine-paged") else "off"]
    if base.endswith("paged"):  # the paged variant: prefills ride in decode steps
        cmd.append("--paged-kv")
    share = next((x[2:] for x in extras if x.startswith("gu") and "=" not in x), "")
    if share:  # +guF: --gpu-memory-utilization F (with +auto)
        cmd += ["--gpu-memory-utilization", share]
    block = next((x[2:] for x in extras if x.startswith("bs") and "=" not in x), "")
    if block:  # +bsN: KV blocks of N tokens
        cmd += ["--kv-block-size", block]
    if base.endswith("restack"):  # the batch restacked at each join and leave (before the slot batch)
        cmd += ["--slot-batch", "off"]
    if "mml" in extras:  # +mml: --max-model-len of one request here (the slots no longer than that)
        cmd += ["--max-model-len", str(prompt + new)]
    env = dict(os.environ)
    env.update(x.split("=", 1) for x in extras if "=" in x)  # +NAME=VALUE: the server's environment
    site_lines = []
    if switch:  # an experiment: every Python process of the server switches threads every SWITCH ms (the
        # engine process too: its own choice, engine_core.switch_interval, answers SWITCH)
        site_lines += ["import sys", f"sys.setswitchinterval({float(switch) / 1e3})",
                       "import portable_infer.serving.engine_core as _ec",
                       f"_ec.switch_interval = lambda device: {float(switch) / 1e3}"]
    if "probe" in extras:  # where the engine process's decode steps spend their time (step_probe.py)
        name = "".join(c if c.isalnum() or c in "-." else "_" for c in config)
        env["PORTABLE_INFER_PROBE"] = str(PROBE_DIR / f"probe-{name}.json")
        site_lines += ["import sys", f"sys.path.insert(0, {str(Path(__file__).resolve().parent)!r})", "import step_probe"]
    if site_lines:
        site = Path(f"/tmp/site-{abs(hash(config))}")
        site.mkdir(exist_ok=True)
        (site / "sitecustomize.py").write_text("\n".join(site_lines) + "\n")
        env["PYTHONPATH"] = f"{site}:{env.get('PYTHONPATH', '')}"
    log = open(f"/tmp/serve-{config.replace(', ', '-')}.log", "w")
    srv = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        t = time.perf_counter()
        while True:
            if srv.poll() is not None:
                raise RuntimeError(f"server exited: {Path(log.name).read_text()[-2000:]}")
            try:
                if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                    break
            except Exception:  # noqa: BLE001
                pass
            time.sleep(1)
        say(f"server ({config}) ready in {time.perf_counter() - t:.0f} s")
        for line in Path(log.name).read_text().splitlines():  # the budget, and whether the device draws
            if line.startswith(("KV budget:", "engine process:")) or "drawn on the host" in line or "WARNING" in line:
                say(f"  server: {line}")
        if auto:
            say(f"  GPU memory after the warm-up: {gpu_memory()}")
        from portable_infer.engine import measure, tune

        if any("=" in x for x in extras):  # a variable the config sets is not raced: the cache is another config's
            say("  (this config sets a kernel switch's variable: the loader does not race it)")
        else:
            for d in tune.cached_decisions(measure.tune_cache_dir(), pkg):  # what load() measured and chose
                say(f"  measured choice: {d['chosen']} (ms a step by batch: {d['timings_ms']})")
        http_level(url, prompts(warm, prompt, vocab, seed=1), WARM_TOKENS, sampling=sampling)  # warm-up (--warm)
        for n, round_ in [(n, k) for k in range(rounds) for n in levels]:
            reqs = prompts(n, prompt, vocab, SEED + round_)
            theirs = pair(reqs) if pair is not None and round_ % 2 else None  # rounds 2, 4, ...: GenAI first
            seen = []
            stop = [False]

            def sample():  # the KV bytes and running requests the server's metrics report, twice a second
                while not stop[0]:
                    seen.append(server_gauges(url))
                    time.sleep(0.5)

            th = threading.Thread(target=sample, daemon=True)
            th.start()
            start = {}

            def at_start():  # the server's CPU seconds and step clock as the clients start
                start.update(cpu=tree_cpu_s(srv.pid), clock=step_clock(url), t=time.perf_counter())

            r = http_level(url, reqs, new, at_start, sampling)
            wall = time.perf_counter() - start["t"]
            r["steps"] = step_summary(start["clock"], step_clock(url), wall)
            stop[0] = True
            th.join()
            r["server_cores"] = (tree_cpu_s(srv.pid) - start["cpu"]) / wall
            for key, k, scale in (("kv_gib", 0, 2**30), ("running_max", 1, 1)):
                got = [v[k] for v in seen if v[k] == v[k]]
                r[key] = max(got) / scale if got else float("nan")
            rows[(f"portable_infer ({config})" + (f", round {round_ + 1}" if rounds > 1 else ""), n)] = r
            if pair is not None:
                theirs = theirs or pair(reqs)
                rows[(f"GenAI Engine (paged), paired with {config}, round {round_ + 1}", n)] = theirs
                pairs.append({"config": config, "streams": n, "round": round_ + 1, "ours": r, "genai": theirs})
                say(f"  {time.strftime('%H:%M:%S')} genai {n} (paired): {brief(theirs)}")
            if auto:
                say(f"  GPU memory after {n} streams: {gpu_memory()}")
            say(f"  {time.strftime('%H:%M:%S')} {config} {n}: {brief(r)}")
    finally:
        srv.terminate()
        try:
            srv.wait(60)
        except subprocess.TimeoutExpired:
            srv.kill()


PROBE_DIR = Path("/tmp")  # where +probe's summaries go (main: --out)


# --- paired rounds (--paired) ---------------------------------------------------------------------
TARGET_RATIO = 1.2  # issue #21: at least 1.2x GenAI's Engine at each level, in the same run


def paired_rounds(pairs: list, target: float = TARGET_RATIO) -> list:
    """Each config and level's rounds, from ``serve_levels``' ``pairs`` (ours and GenAI's row of one
    round, on the same prompts, one right after the other): the ratios of our tok/s to GenAI's, their
    median, min and max, and in how many rounds the ratio reached ``target``. A drift of the machine
    between rounds hits both rows of a round alike, so a round's ratio is the comparison; GenAI's
    single figure against our several rounds was not."""
    groups: dict = {}
    for p in pairs:
        groups.setdefault((p["config"], p["streams"]), []).append(p["ours"]["tok_s"] / p["genai"]["tok_s"])
    return [{"config": c, "streams": n, "rounds": len(r), "ratios": r, "median": statistics.median(r),
             "min": min(r), "max": max(r), "at_target": sum(x >= target for x in r)} for (c, n), r in groups.items()]


def say_paired(pairs: list) -> None:
    """The paired rounds, each round's row and then each config and level in one line."""
    say("\nPaired rounds (--paired: GenAI's Engine in this process, on each round's prompts right after our "
        "server's level in rounds 1, 3, ... and right before it in rounds 2, 4, ...):\n")
    say("| config | streams | round | ours tok/s (TTFT p50 ms) | GenAI tok/s (TTFT p50 ms) | ratio | errors ours / GenAI |")
    say("|---|---|---|---|---|---|---|")
    for p in pairs:
        o, g = p["ours"], p["genai"]
        say(f"| {p['config']} | {p['streams']} | {p['round']} | {o['tok_s']:,.0f} ({o['ttft_p50_ms']:,.0f}) | "
            f"{g['tok_s']:,.0f} ({g['ttft_p50_ms']:,.0f}) | {o['tok_s'] / g['tok_s']:.2f}x | {o['errors']} / {g['errors']} |")
    say(f"\n| config | streams | rounds | ratio median | min | max | rounds at >= {TARGET_RATIO}x |")
    say("|---|---|---|---|---|---|---|")
    for r in paired_rounds(pairs):
        say(f"| {r['config']} | {r['streams']} | {r['rounds']} | {r['median']:.2f}x | {r['min']:.2f}x | "
            f"{r['max']:.2f}x | {r['at_target']} of {r['rounds']} |")


# --- transformers' continuous batching -------------------------------------------------------------
def hf_levels(hf: Path, args, budget: int, vocab: int, rows: dict) -> None:
    """``gpu_hf_batching.py`` on the HF folder the export read: the same prompts (round k: SEED + k - 1),
    the same KV budget in tokens; its rows into ``rows``."""
    cmd = [sys.executable, str(Path(__file__).with_name("gpu_hf_batching.py")), str(hf), "--levels",
           *map(str, args.levels), "--prompt", str(args.prompt), "--new", str(args.new), "--budget-tokens",
           str(budget), "--seed", str(SEED), "--warm", str(min(args.warm, 64)), "--rounds", "1",
           "--temperature", str(args.temperature), "--top-p", str(args.top_p),
           "--device", "cpu" if args.provider == "cpu" else "cuda"]
    say("\ntransformers' continuous batching (gpu_hf_batching.py):")
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=480)
        out, err, code = r.stdout, r.stderr, r.returncode
    except subprocess.TimeoutExpired as exc:
        out, err, code = (exc.stdout or b"").decode(errors="replace"), "timed out (480 s)", -1
    for line in out.splitlines():
        try:
            d = json.loads(line)
        except ValueError:
            continue
        if "setup" in d:
            say(f"  setup: {json.dumps(d['setup'])}")
        elif "level" in d:
            rows[("transformers generate_batch (paged)", d["level"])] = d
            say(f"  {time.strftime('%H:%M:%S')} transformers {d['level']}: "
                f"{brief(d)}")
    if code:
        say(f"  failed ({code}): {err[-1500:]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--assets", type=Path, required=True)
    ap.add_argument("--out", type=Path, default=Path("."))
    ap.add_argument("--work", type=Path, default=Path("/root/work"))
    ap.add_argument("--parts", nargs="+", default=["make", "export", "genai", "serve", "engine"])
    ap.add_argument("--shape", choices=tuple(SHAPES), default="8b")
    ap.add_argument("--levels", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=256)
    ap.add_argument("--configs", nargs="+", default=["inproc", "engine"])
    ap.add_argument("--rounds", type=int, default=1, help="each level this many times on one server (round 1: cold)")
    ap.add_argument("--warm", type=int, default=4, help="requests of 16 new tokens at once before the levels, "
                    "ours (each server) and GenAI's alike (4: a cold round 1; the largest level: steady state)")
    ap.add_argument("--prefill-chunk", type=int, default=512, help="serve --prefill-chunk (a group prefills up to 4x this)")
    ap.add_argument("--provider", default="cuda", help="ours (cpu: a dry run of the script with --package)")
    ap.add_argument("--package", type=Path, default=None, help="serve this package instead of the export")
    ap.add_argument("--genai-model", type=Path, default=None, help="drive this GenAI model instead of the build")
    ap.add_argument("--precisions", nargs="+", choices=["fp16", "int4"], default=["fp16"], help="our packages' precisions")
    ap.add_argument("--temperature", type=float, default=0.0,
                    help="every runtime's requests sample at this temperature (request i seeded i); 0: greedy")
    ap.add_argument("--top-p", type=float, default=1.0, help="with --temperature: nucleus bound")
    ap.add_argument("--paired", action="store_true",
                    help="GenAI's Engine loaded in this process before our servers start, each of our rounds' levels "
                    "paired with its level on the same prompts (after ours in rounds 1, 3, ..., before in 2, 4, ...); "
                    "a table of the rounds' ratios (the 'engine' part still runs GenAI once on its own if listed)")
    ap.add_argument("--budget-streams", type=int, default=None,
                    help="the KV budget, everyone's: this many whole requests (--prompt + --new tokens each; default "
                    "the largest level). Below the largest level it measures how many sequences each runtime runs at "
                    "once in the same KV memory (item 4): slots hold whole requests, so their --max-batch is this")
    args = ap.parse_args()
    sampling = {"temperature": args.temperature, "top_p": args.top_p} if args.temperature > 0 else {}
    shape = SHAPES[args.shape]
    hf, ours, gen = (args.work / f"llama{args.shape}-{x}" for x in ("hf", "ours", "genai"))
    ours, gen = args.package or ours, args.genai_model or gen
    streams = args.budget_streams or max(args.levels)
    budget = streams * (args.prompt + args.new)
    rows: dict = {}
    say(f"# GPU serving, Llama {args.shape} shape ({', '.join(args.precisions)} ours; GenAI fp16), {args.prompt}-token prompts, {args.new} new tokens, "
        f"{'temperature %g, top_p %g, seeded' % (args.temperature, args.top_p) if sampling else 'greedy'}")
    if "make" in args.parts and not (hf / "config.json").is_file():
        make_hf(hf, args.assets, shape, "float16")
    packages = {prec: ours if prec == "fp16" else ours.with_name(f"{ours.name}-{prec}") for prec in args.precisions}
    for prec, pkg in packages.items():
        if "export" in args.parts and not (pkg / "manifest.json").is_file():
            variants = "static,paged" if any(c.split("+")[0].endswith("paged") for c in args.configs) else "static"
            r = timed([sys.executable, "-m", "portable_infer.cli", "export", str(hf), "-o", str(pkg), "--precision", prec,
                       "--activations", "fp16", "--variants", variants, "--no-verify", "--force"])
            say(f"export (ours, {prec}): {r}")
    block = 128
    blocks = -(-budget // block) + 8
    kv_token = 2 * shape["num_hidden_layers"] * shape["num_key_value_heads"] * shape["head_dim"] * 2  # fp16 K and V
    if "genai" in args.parts and not (gen / "genai_config.json").is_file():
        extra = ["use_paged_attention=true", f"max_batch_size={min(256, max(args.levels))}",
                 f"paged_block_size={block}", f"num_blocks={blocks}"]
        r = timed([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o", str(gen), "-p", "fp16",
                   "-e", "cuda", "-c", str(args.work / "genai-cache"), "--extra_options", *extra])
        say(f"GenAI builder: {r}")
    vocab = shape["vocab_size"]
    args.out.mkdir(parents=True, exist_ok=True)
    global PROBE_DIR
    PROBE_DIR = args.out
    if "paged-steps" in args.parts:  # the paged engine's decode steps, plain against CUDA graphs
        cmd = [sys.executable, str(Path(__file__).with_name("gpu_paged_steps.py")), str(ours), "--graphs", "--block",
               "128", "--batches", "1", "50", *map(str, args.levels), "--prompt", str(args.prompt), "--mix", str(args.new)]
        say("\nPaged decode steps, plain against CUDA graphs (gpu_paged_steps.py --graphs):\n")
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
            lines = r.stdout.strip().splitlines() + ([f"failed: {r.stderr[-1500:]}"] if r.returncode else [])
        except subprocess.TimeoutExpired as exc:
            lines = [f"timed out: {(exc.stdout or b'').decode(errors='replace')[-1500:]}"]
        for line in lines:
            say(line)
    pairs: list = []
    pair = None
    if args.paired and "serve" in args.parts:
        say("\nGenAI's Engine for the paired rounds (loaded before our servers start: they share the device):")
        try:
            pair = genai_runner(gen, args.prompt, args.new, vocab, blocks * block * kv_token / 2**30, args.warm, blocks,
                                sampling)
        except Exception as exc:  # noqa: BLE001 - our servers still run, unpaired
            say(f"GenAI Engine failed to load, the rounds run unpaired: {type(exc).__name__}: {exc}")
    if "serve" in args.parts:
        for config, prec in [(c, p) for p in packages for c in args.configs]:
            try:
                serve_levels(packages[prec], config if prec == "fp16" else f"{config}, {prec}", args.levels, args.prompt,
                             args.new, vocab, rows, args.provider, args.rounds, args.prefill_chunk, args.warm, budget,
                             sampling, pair, pairs)
            except Exception as exc:  # noqa: BLE001 - the other parts still run
                say(f"serve {config} failed: {type(exc).__name__}: {exc}")
            (args.out / "gpu_serving.md").write_text("\n".join(LINES) + "\n")  # so far (a time limit may end it)
    if "steps" in args.parts:  # the engine alone on this machine, at the serving levels' contexts
        for prec, pkg in packages.items():
            cmd = [sys.executable, str(Path(__file__).with_name("gpu_batch_steps.py")), str(pkg), "--batches", "1",
                   *map(str, args.levels), "--prompt", str(args.prompt), "--mix", str(args.new),
                   "--provider", args.provider]
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
            say(f"\nThe engine alone ({prec}; gpu_batch_steps.py --mix {args.new}):\n")
            for line in (r.stdout.strip().splitlines() or [f"failed: {r.stderr[-1500:]}"]):
                say(line)
    if "engine" in args.parts:
        try:
            genai_levels(gen, args.levels, args.prompt, args.new, vocab, rows, blocks * block * kv_token / 2**30,
                         args.warm, blocks, sampling)
        except Exception as exc:  # noqa: BLE001
            say(f"GenAI Engine failed: {type(exc).__name__}: {exc}")
        (args.out / "gpu_serving.md").write_text("\n".join(LINES) + "\n")  # so far
    if "transformers" in args.parts:  # transformers' own continuous batching, a process of its own
        hf_levels(hf, args, budget, vocab, rows)
    say(f"\nWarm-up before the levels: {args.warm} requests of {WARM_TOKENS} new tokens at once (ours: each server; GenAI alike)")
    say(f"\nKV budget: {budget} tokens ({streams} x ({args.prompt} + {args.new}))\n")
    say("| runtime | streams | tok/s | TTFT p50 / p99 ms | inter-chunk p99 ms | errors | server cores | KV GiB (max) "
        "| running at once (max) |")
    say("|---|---|---|---|---|---|---|---|---|")
    for (name, n), r in rows.items():
        say(f"| {name} | {n} | {r['tok_s']:,.0f} | {r['ttft_p50_ms']:,.0f} / {r['ttft_p99_ms']:,.0f} | "
            f"{r['itl_p99_ms']:.0f} | {r['errors']} | {r.get('server_cores', float('nan')):.2f} | "
            f"{r.get('kv_gib', float('nan')):.2f} | {r.get('running_max', float('nan')):.0f} |")
    say("\n(KV GiB: ours, the most the server's metrics reported; GenAI's, its paged pool as configured. "
        "Running at once: ours, the most admitted requests the metrics reported (sampled twice a second); "
        "GenAI's, the most requests between their first token and the end of their turn; transformers', "
        "the most requests between their scheduling and their end.)")
    if pairs:
        say_paired(pairs)
    clocked = [(k, r["steps"]) for k, r in rows.items() if r.get("steps")]
    if clocked:
        say("\nWhere our step loop spent each level (server /metrics, the level's difference):\n")
        say("| runtime | streams | decode steps | rows a step | decode ms: forward + host | prefill steps | "
            "prefill s: forward + host | plan s | idle s | level s | preempted | prefix hits |")
        say("|---|---|---|---|---|---|---|---|---|---|---|---|")
        for (name, n), c in clocked:
            say(f"| {name} | {n} | {c['decode_steps']:.0f} | {c['rows']:.1f} | {c['decode_forward_ms']:.2f} + "
                f"{c['decode_host_ms']:.2f} | {c['prefill_steps']:.0f} | {c['prefill_forward_s']:.2f} + "
                f"{c['prefill_host_s']:.2f} | {c['plan_s']:.2f} | {c['idle_s']:.2f} | {c['wall_s']:.2f} | "
                f"{c.get('preempted', float('nan')):.0f} | {c.get('prefix_hits', float('nan')):.0f} |")
    (args.out / "gpu_serving.md").write_text("\n".join(LINES) + "\n")
    (args.out / "gpu_serving.json").write_text(json.dumps({f"{k[0]}|{k[1]}": v for k, v in rows.items()}, indent=1))


if __name__ == "__main__":
    main()
