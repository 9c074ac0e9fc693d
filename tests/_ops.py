"""Helpers for the server-operations tests: a gate that holds the decode loop, a tokenizer that
blocks on a marker, a server fixture factory, and raw-socket and SSE readers. Every wait is bounded."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time

WAIT_S = 30  # the bound on every wait; a hang fails the test instead of blocking the run


class Gate:
    """Open: the engine runs; closed: the next forward waits (the scheduler's loop holds still)."""

    def __init__(self):
        self.open_event = threading.Event()
        self.open_event.set()

    def close(self):
        self.open_event.clear()

    def open(self):
        self.open_event.set()

    def __call__(self, *_):
        assert self.open_event.wait(WAIT_S), "the gate stayed closed"


class BlockingTokenizer:
    """The real tokenizer, except that text holding ``marker`` waits for ``release`` (after setting
    ``entered``); ``calls`` counts encodes, so a test can tell whether a request was tokenized."""

    def __init__(self, tokenizer, marker: str = "BLOCK"):
        self.tokenizer, self.marker = tokenizer, marker
        self.entered, self.release = threading.Event(), threading.Event()
        self.calls = 0

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)

    def _wait(self, texts):
        self.calls += 1
        if any(self.marker in t for t in texts):
            self.entered.set()
            assert self.release.wait(WAIT_S), "the tokenizer was never released"

    def encode(self, text, *args, **kwargs):
        self._wait([text])
        return self.tokenizer.encode(text, *args, **kwargs)

    def encode_batch(self, texts, *args, **kwargs):
        self._wait(texts)
        return self.tokenizer.encode_batch(texts, *args, **kwargs)


def with_tokenizer(model, tokenizer):
    import dataclasses

    from portable_infer.model import Model

    codec = dataclasses.replace(model.codec, tokenizer=tokenizer)
    return Model(model.manifest, model.engine, codec, model.path, model.selection)


def wait_for(predicate, what: str, timeout: float = WAIT_S):
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)
    return value


def wait_idle(scheduler):
    def idle():
        s = scheduler.stats()
        return not (s.running + s.prefilling + s.waiting or s.blocks_used)
    wait_for(idle, "the scheduler to become idle")


def sse_lines(response) -> list:
    """The ``data:`` payloads of an SSE response, read to its end."""
    return [line[len("data: "):] for line in response.iter_lines() if line.startswith("data: ")]


def error_of(payload: str) -> dict:
    err = json.loads(payload)["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return err


class RawConnection:
    """A plain TCP connection to the server, for clients no HTTP library would be."""

    def __init__(self, url: str):
        host, port = url.removeprefix("http://").split(":")
        self.sock = socket.create_connection((host, int(port)), timeout=WAIT_S)

    def send(self, data: bytes) -> bool:
        """False once the server has closed (or reset) the connection."""
        try:
            self.sock.sendall(data)
            return True
        except OSError:
            return False

    def read_until_closed(self, timeout: float = WAIT_S) -> bytes:
        """Everything the server sends until it closes the connection (a reset ends it too)."""
        self.sock.settimeout(timeout)
        out = bytearray()
        with contextlib.suppress(ConnectionResetError):
            while chunk := self.sock.recv(65536):
                out += chunk
        return bytes(out)

    def trickle(self, pieces, every_s: float = 0.05) -> bytes:
        """Send ``pieces`` one by one, ``every_s`` apart, until the server answers and closes;
        returns what it sent (the pieces outlast any timeout under test)."""
        self.sock.settimeout(every_s)
        for piece in pieces:
            if not self.send(piece):
                break
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                continue
            except ConnectionResetError:
                return b""
            return chunk + self.read_until_closed() if chunk else b""
        return self.read_until_closed()

    def close(self):
        self.sock.close()


# --- a server in a process of its own (tests/_slow_serve.py) ---------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def status(url: str, timeout: float = 5) -> int | None:
    """The status of GET ``url``, or None when nothing answers within ``timeout``."""
    import httpx

    try:
        return httpx.get(url, timeout=timeout).status_code
    except httpx.TransportError:
        return None


def start_server(package, tmp_path, shutdown_timeout_s: float, preexec_fn=None):
    """tests/_slow_serve.py on a free port: (process, url, log path), once /ready answers 200."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = tmp_path / "server.log"
    env = {**os.environ, "PORTABLE_INFER_HOME": str(tmp_path / "home")}
    script = Path(__file__).resolve().parent / "_slow_serve.py"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, str(script), str(package), str(port), str(shutdown_timeout_s)],
                                stdout=log, stderr=subprocess.STDOUT, env=env, preexec_fn=preexec_fn)
    try:
        wait_for(lambda: proc.poll() is not None or status(f"{url}/ready") == 200, "the server to start", 120)
        assert proc.poll() is None, log_path.read_text()
    except BaseException:
        proc.kill()
        proc.wait(WAIT_S)
        raise
    return proc, url, log_path


def stop_server(proc) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(WAIT_S)
