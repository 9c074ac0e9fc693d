"""The engine process's side of ``serve --engine-process`` (:mod:`~portable_infer.serving.engine_process`
is the API process's): it loads the model, runs the scheduler, and answers the pipe. Pieces and ends
go back in batches (:class:`Outbox`), token ids only (the API process makes the text); errors cross
as plain data (:func:`pack_error`).
"""

from __future__ import annotations

import gc
import importlib
import sys
import threading

from portable_infer.errors import PortableInferError
from portable_infer.serving.drain import DrainThread
from portable_infer.serving.handle import RequestStats
from portable_infer.serving.scheduler_config import SchedulerConfig, SchedulerObserver


def pack_error(exc: BaseException) -> tuple:
    """An exception as plain data: class, message, attributes (its arguments need not pickle)."""
    attrs = {k: v for k, v in vars(exc).items() if isinstance(v, (str, int, float, bool, type(None)))}
    return type(exc).__module__, type(exc).__qualname__, str(exc), attrs


def unpack_error(packed: tuple) -> BaseException:
    """The exception :func:`pack_error` packed; a class this process cannot import becomes a
    :class:`PortableInferError` with the same message."""
    module, name, message, attrs = packed
    try:
        cls = getattr(importlib.import_module(module), name)
        if not (isinstance(cls, type) and issubclass(cls, BaseException)):
            raise TypeError(name)
    except Exception:  # noqa: BLE001 - rebuilt as the base class below
        return PortableInferError(f"{name}: {message}")
    exc = cls.__new__(cls)
    BaseException.__init__(exc, message)
    exc.__dict__.update(attrs)
    return exc


def failed_stats(rid: str, prompt_tokens: int) -> RequestStats:
    """The stats of a request that ended with an error before any token."""
    return RequestStats(rid, prompt_tokens, 0, "error", queue_s=0.0, ttft_s=None, inter_token_s=(), total_s=0.0)


# --- the engine process --------------------------------------------------------------------------
# How often the engine process's threads hand the GIL over where its engine runs on a device
# (``sys.setswitchinterval``; Python's default is 5 ms). There the step loop's thread starts each
# decode forward while the picks worker, the emitter and the outbox's sender take the last step's
# tokens through their rules and send them; at 5 ms the loop waited behind them for the GIL before
# each run and the picks did not overlap the device. H100, Llama-3.1-8B shape fp16, 256 streams
# (benchmarks/step_probe.py): the host part before the run 2.7 ms, 0.35 of it CPU; the forward
# 15.2 ms a step against the engine alone's 12.8; at 1 ms 14.3; at 0.2 ms 13.0: +4-15 % tokens/s
# for ~0.6 more of the server's cores (docs/benchmarks.md, Session 32). The process is ours, so is
# the setting; a CPU engine's process keeps the default (its forwards are the cores' work).
DEVICE_SWITCH_INTERVAL_S = 0.0002


def switch_interval(device: str) -> float | None:
    """The GIL switch interval the engine process runs with on ``device`` (None: Python's own)."""
    return None if device == "cpu" else DEVICE_SWITCH_INTERVAL_S


class Outbox:
    """What the engine process sends: replies at once, pieces and ends in batches (its
    :class:`DrainThread` sends whatever piled up while it sent the last batch: about one message
    per step)."""

    def __init__(self, conn):
        self.conn = conn
        self._send_lock = threading.Lock()
        self._sender = DrainThread(lambda events: self.send(("batch", events)), "portable-infer-outbox")

    def send(self, msg) -> None:
        with self._send_lock:
            self.conn.send(msg)

    def add(self, event) -> None:
        self._sender.put(event)

    def close(self) -> None:
        self._sender.close()


class Forward:
    """The writer of one request in the engine process: its pieces and end go to the outbox."""

    def __init__(self, rid: str, outbox: Outbox, requests: dict):
        self.rid, self.outbox, self.requests = rid, outbox, requests

    def put(self, piece) -> None:
        self.outbox.add(("put", self.rid, piece))

    def end(self, last, stats) -> None:
        self.requests.pop(self.rid, None)
        packed = ("error", pack_error(last)) if isinstance(last, BaseException) else ("piece", last)
        self.outbox.add(("end", self.rid, packed, stats))


class ForwardObserver(SchedulerObserver):
    """The engine's observer hooks, sent to the API process's observers."""

    def __init__(self, outbox: Outbox):
        self.outbox = outbox

    def first_token(self, ttft_s: float) -> None:
        self.outbox.add(("obs", "first_token", ttft_s))

    def inter_token(self, seconds: float) -> None:
        self.outbox.add(("obs", "inter_token", seconds))

    def finished(self, stats) -> None:
        self.outbox.add(("obs", "finished", stats))


def engine_main(conn, path, load_kwargs: dict, config: SchedulerConfig) -> None:
    """The engine process: load, answer ready (or the error), then serve the pipe until closed."""
    import portable_infer
    from portable_infer.serving.scheduler import Scheduler

    try:
        model = portable_infer.load(path, **load_kwargs)
        sched = Scheduler(model, config)
    except BaseException as exc:  # noqa: BLE001 - the API process raises it
        conn.send(("error", pack_error(exc)))
        return
    gc.freeze()  # what loading made lives as long as the process: later collections skip it (as vLLM does)
    e = model.engine
    interval = switch_interval(e.device)
    if interval is not None:
        sys.setswitchinterval(interval)
    outbox = Outbox(conn)
    outbox.send(("ready", {"path": str(model.path), "provider": e.provider, "variant": e.variant.name,
                           "device": e.device, "greedy_on_device": e.greedy_on_device,
                           "masks_on_device": e.masks_on_device, "max_context": e.max_context,
                           "max_kv_tokens": model.max_kv_tokens, "kv_budget_tokens": sched.config.kv_budget_tokens,
                           "budget_note": sched.budget_note, "switch_interval_s": sys.getswitchinterval()}))
    requests: dict = {}  # rid -> the scheduler's Request, while open
    try:
        while True:
            try:
                msg = conn.recv()
            except (EOFError, OSError):  # the API process is gone
                break
            kind = msg[0]
            if kind == "close":
                break
            if kind == "submit":  # checked in the API process already
                _, rid, ids, params = msg
                writer = Forward(rid, outbox, requests)
                try:
                    requests[rid] = sched.submit_to(writer, ids, params, text=False)  # the text is made there
                except Exception as exc:  # noqa: BLE001 - closing, or its queue is full: this request's end
                    writer.end(exc, failed_stats(rid, len(ids)))
            elif kind in ("cancel", "stop"):  # the client left; a stop string in the text
                r = requests.get(msg[1])
                if r is not None:
                    (sched.queues.cancel if kind == "cancel" else sched.queues.stop)(r)
            elif kind == "stats":
                outbox.send(("reply", msg[1], (True, sched.stats())))
            elif kind == "observe":
                sched.add_observer(ForwardObserver(outbox))
    finally:
        sched.close()
        outbox.close()
        conn.close()
