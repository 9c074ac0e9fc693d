"""The scheduler in a process of its own: the server's asyncio loop (HTTP, JSON, SSE framing) and the
engine's loop (forwards, each row's pick, detokenizing) stop sharing one GIL, as vLLM v1 splits
its API server from its engine core::

    API process (the server)                       engine process (spawned)
    ProcessScheduler.submit_ids ── submit ──────>  Scheduler.submit_to(Forward(rid), text=False)
      (checked here: checked_request)
    RequestHandle <── text ── _Reader <── one ───  Forward.put / end (step loop, emitter):
      (detokenizer, stop strings here)   message    token ids, logprobs, finish reasons
                                         per batch   -> Outbox: a sender thread
    a stop string in the text ── stop ──────────>  queues.stop
    handle.cancel() ── cancel ──────────────────>  queues.cancel
    stats() ── ask ─────────────────────────────>  reply

The text is made here, as vLLM v1's API server detokenizes: the engine process's GIL is left to the
steps and each row's rule. A stop string found here ends the request in the engine (one message);
the tokens the engine made meanwhile are dropped and the reader gets what the in-process scheduler
gives (the piece that completed the stop string, with finish reason "stop", and its count).

:class:`ProcessScheduler` has the scheduler's public face, so the server runs over either. Its
``model`` holds the package's manifest, tokenizer, template and sampling defaults, no session (the
weights load once, in the engine process). ``submit_ids`` runs the same checks as in-process and
waits for no round trip; ``has_capacity`` counts the requests open here; errors cross the pipe as
their class, message and attributes. If the engine process dies, every open request ends with a
:class:`PortableInferError` naming its exit code, and the scheduler reports itself not alive.
"""

from __future__ import annotations

import itertools
import logging
import multiprocessing as mp
import threading
from dataclasses import dataclass, replace
from pathlib import Path

from portable_infer.decode.sampling import SamplingParams
from portable_infer.errors import PortableInferError
from portable_infer.serving.engine_core import engine_main, failed_stats, pack_error, unpack_error
from portable_infer.serving.kv_budget import with_tokens
from portable_infer.serving.handle import open_handle
from portable_infer.serving.scheduler_setup import checked_request, kv_pool, row_limit
from portable_infer.serving.scheduler_config import SchedulerConfig, SchedulerObserver
from portable_infer.text.tool_chat import submit_chat_with_tools, wants_tools

logger = logging.getLogger(__name__)


def splits(mode: str, providers, available=None) -> bool:
    """Whether ``serve --engine-process MODE`` runs the engine in a process of its own: "on", "off",
    or "auto" (the default): where the first provider ``providers`` would try that this ONNX Runtime
    offers (``available``: its names, default ``get_available_providers()``) keeps its tensors on a
    device. There a step loop sharing the server's GIL is bound by Python (H200, 8B: 9,827
    against 7,752 tok/s at 256 streams, docs/benchmarks.md Session 13); on the CPU the forward's
    own threads use the cores and the split cost ~5 % (2 cores, 16 clients), so it stays in one process."""
    from portable_infer.engine.devices import device_of
    from portable_infer.engine.providers import default_ort, resolve

    if mode != "auto":
        return mode == "on"
    offered = set(default_ort().get_available_providers() if available is None else available)
    first = next((s for s in resolve(providers) if s.ort_name in offered), None)
    return first is not None and device_of(first.ort_name) != "cpu"


@dataclass(frozen=True)
class EngineInfo:
    """What the API process knows of the engine in the other process (``model.engine``)."""

    provider: str
    variant: object  # the manifest's GraphVariant
    device: str
    greedy_on_device: bool
    masks_on_device: bool
    max_context: int


def settled_config(config: SchedulerConfig, info: dict) -> SchedulerConfig:
    """``config`` with the KV budget the engine process settled (its ready message's
    ``kv_budget_tokens``: sized from the device there, serving.kv_budget; None: as given)."""
    if info["kv_budget_tokens"] is None:
        return config
    return with_tokens(config, info["kv_budget_tokens"])


class ProcessScheduler:
    """A :class:`~portable_infer.serving.scheduler.Scheduler` run in a spawned process over
    ``portable_infer.load(path, **load_kwargs)`` (see the module doc).

    Raises what loading raises (rebuilt from the engine process), before it returns."""

    def __init__(self, path, load_kwargs: dict | None = None, config: SchedulerConfig = SchedulerConfig()):
        from portable_infer.model import Model
        from portable_infer.package.manifest import Manifest
        from portable_infer.text.codec import TextCodec

        self.config = config
        ctx = mp.get_context("spawn")  # a fork would copy ONNX Runtime's and CUDA's state
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=engine_main, args=(child, None if path is None else str(path),
                                                            dict(load_kwargs or {}), config),
                                 name="portable-infer-engine", daemon=True)
        self._proc.start()
        child.close()
        self._send_lock = threading.Lock()
        self._lock = threading.Lock()  # the tables below
        self._writers: dict = {}  # rid -> HandleWriter of an open request
        self._asks: dict = {}  # qid -> [threading.Event, value]
        self._observers: list = []
        self._ids = itertools.count()
        self._closing = False
        first = self._recv_first()
        if first[0] == "error":
            self._proc.join(10)
            raise unpack_error(first[1])
        info = first[1]
        path = Path(info["path"])
        manifest = Manifest.load(path)
        engine = EngineInfo(info["provider"], manifest.variant(info["variant"]), info["device"],
                            info["greedy_on_device"], info["masks_on_device"], info["max_context"])
        self.model = Model(manifest, engine, TextCodec.from_package(path, manifest), path,
                           max_kv_tokens=info["max_kv_tokens"])
        self.codec = self.model.codec
        self.max_context = self.model.max_context
        self.config = config = settled_config(config, info)
        self.budget_note = info["budget_note"]
        self.switch_interval_s = info["switch_interval_s"]  # the engine process's GIL switch interval (engine_core)
        self._pool = kv_pool(config, engine.variant.kv, engine.device)  # the budget's size, for the checks at submission
        self.row_limit = row_limit(engine, config, self._pool, self.max_context)  # and what a slot holds
        self._receiver = threading.Thread(target=self._receive, name="portable-infer-engine-pipe", daemon=True)
        self._receiver.start()

    # --- the scheduler's public face ------------------------------------------------------------
    def submit(self, prompt, *, truncate: bool = False, **sampling):
        return self.submit_ids(self.codec.as_ids(prompt), self.model.params(**sampling), truncate=truncate)

    def submit_chat(self, messages: list, *, tools=None, tool_choice=None, parallel_tool_calls=None,
                    tool_parser=None, truncate: bool = False, **sampling):
        if wants_tools(tools, tool_choice, parallel_tool_calls, tool_parser):
            return submit_chat_with_tools(self, messages, tools, tool_choice, parallel_tool_calls, tool_parser,
                                          truncate=truncate, **sampling)
        return self.submit_ids(self.codec.chat_ids(messages), self.model.params(**sampling), truncate=truncate)

    def submit_ids(self, ids: list, params: SamplingParams, *, truncate: bool = False):
        """Queue a prompt of token ids in the engine process; its handle reads the pieces here.
        The request's checks run here (``scheduler.checked_request``: its errors are raised at
        once) and nothing waits for the engine: a request it still refuses (it closed, its queue
        filled meanwhile) ends with that error."""
        ids, _, _ = checked_request(self.model, self._pool, ids, params, truncate, self.row_limit)
        rid = f"req-{next(self._ids)}"
        handle, writer = open_handle(rid, len(ids), self._cancel, rid)
        with self._lock:
            if not self.alive:
                raise PortableInferError("the scheduler is closed; create a new one")
            self._writers[rid] = _Reader(writer, self.codec.text_stream(params))  # before any piece
        try:
            self._send(("submit", rid, ids, params))
        except (OSError, ValueError) as exc:  # the pipe broke: the engine process is gone
            with self._lock:
                self._writers.pop(rid, None)
            raise PortableInferError("the engine process is gone; the scheduler is closed") from exc
        return handle

    def stats(self):
        return self._ask(("stats",))[1]

    def has_capacity(self) -> bool:
        """Whether a new request would be accepted: requests open here below what the engine
        admits and queues (``max_batch + max_waiting``; counted here, no round trip)."""
        with self._lock:
            return self.alive and len(self._writers) < self.config.max_batch + self.config.max_waiting

    def add_observer(self, observer: SchedulerObserver) -> None:
        """Call ``observer``'s hooks here (on the pipe's reader thread) as the engine's fire."""
        with self._lock:
            first = not self._observers
            self._observers = [*self._observers, observer]
        if first:  # the engine forwards its hooks' events once; every observer here gets each
            self._send(("observe",))

    @property
    def alive(self) -> bool:
        return self._proc.is_alive() and not self._closing

    def close(self, timeout: float = 10.0) -> None:
        """Stop the engine process; requests still open end with an error."""
        if self._closing:
            return
        self._closing = True
        try:
            self._send(("close",))
        except (OSError, ValueError):  # it is gone already
            pass
        self._proc.join(timeout)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join(timeout)
        self._receiver.join(timeout)
        self._fail_open(PortableInferError("the scheduler was closed before this request finished"))
        self._conn.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # --- the pipe -------------------------------------------------------------------------------
    def _send(self, msg) -> None:
        with self._send_lock:
            self._conn.send(msg)

    def _cancel(self, rid: str) -> None:
        try:
            self._send(("cancel", rid))
        except (OSError, ValueError):  # the engine is gone: its requests ended already
            pass

    def _ask(self, msg) -> tuple:
        """Send ``msg`` and wait for its reply ``(ok, value)``."""
        qid = f"q-{next(self._ids)}"
        waiter = [threading.Event(), None]
        with self._lock:
            if not self._proc.is_alive() or self._closing:
                raise PortableInferError("the scheduler is closed; create a new one")
            self._asks[qid] = waiter
        self._send((*msg, qid))
        waiter[0].wait()
        return waiter[1]

    def _recv_first(self) -> tuple:
        """The engine's first message: ready (with what it loaded) or the error loading raised."""
        while not self._conn.poll(0.5):
            if not self._proc.is_alive():
                return "error", pack_error(PortableInferError(
                    f"the engine process exited (code {self._proc.exitcode}) while loading the model"))
        return self._conn.recv()

    def _receive(self) -> None:
        try:
            while True:
                msg = self._conn.recv()
                if msg[0] == "reply":
                    with self._lock:
                        waiter = self._asks.pop(msg[1], None)
                    if waiter is not None:
                        waiter[1] = msg[2]
                        waiter[0].set()
                else:
                    try:
                        self._dispatch(msg[1])
                    except Exception:  # noqa: BLE001 - a bug here must not leave every other stream hanging
                        logger.exception("handing the engine's pieces to their readers failed")
        except (EOFError, OSError):
            pass
        self._proc.join(5)
        why = "the scheduler was closed" if self._closing else \
            f"the engine process exited (code {self._proc.exitcode})"
        self._fail_open(PortableInferError(f"{why} before this request finished"))

    def _dispatch(self, events: list) -> None:
        for ev in events:
            kind = ev[0]
            if kind == "obs":
                for o in self._observers:
                    try:
                        getattr(o, ev[1])(ev[2])
                    except Exception:  # noqa: BLE001 - metrics must never stop the requests' pieces
                        logger.exception("scheduler observer %s failed", ev[1])
                continue
            with self._lock:
                reader = self._writers.get(ev[1]) if kind == "put" else self._writers.pop(ev[1], None)
            if reader is None:
                continue
            if kind == "put":
                if reader.put(ev[2]):  # a stop string: the engine ends it
                    self._send(("stop", ev[1]))
            elif ev[2][0] == "error":
                reader.writer.end(unpack_error(ev[2][1]), ev[3])
            else:
                reader.end(ev[2][1], ev[3])

    def _fail_open(self, exc: Exception) -> None:
        with self._lock:
            writers, self._writers = self._writers, {}
            asks, self._asks = self._asks, {}
        for waiter in asks.values():
            waiter[1] = (False, pack_error(exc))
            waiter[0].set()
        for rid, reader in writers.items():
            reader.writer.end(exc, failed_stats(rid, reader.writer._handle.prompt_tokens))


class _Reader:
    """One open request here: its handle's writer, and its text made from the engine's token ids
    (the detokenizer and stop strings, as ``Request.emit`` makes it in process)."""

    def __init__(self, writer, text):
        self.writer, self.text = writer, text
        self.tokens = 0  # pieces taken (the engine may make more before it hears of a stop string)
        self.stopped = None  # the piece whose text completed a stop string, held for the end

    def put(self, piece) -> bool:
        """Hand a piece's text to the reader; True when it completes a stop string (the piece is
        held: it becomes the last one when the engine has ended the request)."""
        if self.stopped is not None:
            return False
        self.tokens += 1
        text, reason = self.text.piece(piece.token, None)
        if reason is not None:  # "stop"
            self.stopped = replace(piece, text=text, finish_reason=reason, generation_tokens=self.tokens)
            return True
        self.writer.put(replace(piece, text=text))
        return False

    def end(self, last, stats) -> None:
        if self.stopped is not None:  # the engine ended it on our stop: what came after is dropped
            self.writer.end(self.stopped, replace(stats, generation_tokens=self.tokens, finish_reason="stop"))
            return
        if last.token is not None:  # its last token (a stop id, the length, the context)
            self.tokens += 1
            text, reason = self.text.piece(last.token, last.finish_reason)
            last = replace(last, text=text, finish_reason=reason)
            stats = replace(stats, finish_reason=reason)
        self.writer.end(last, stats)


