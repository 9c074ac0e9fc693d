"""The issue's connection flood against a server process with few file descriptors: 200 idle
sockets, 200 header tricklers and 50 stalled uploads, with the process limited to 300 descriptors.

Before, the flood used up the descriptors: /health timed out (so Kubernetes would restart the
pod) and asyncio logged a traceback for every failed accept(). Now the server holds at most what
the limit leaves (max_connections is lowered to it), a new connection evicts the oldest one with
no request in the app, so a probe always gets in, and nothing logs a traceback. The one bound on
time is the shipped liveness probe's timeout (2 s), for /health."""

from __future__ import annotations

import resource
import socket

import pytest

pytest.importorskip("torch")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

from _ops import start_server, stop_server  # noqa: E402
from _serving import add_tokenizer  # noqa: E402

NOFILE = 300
LIVENESS_TIMEOUT_S = 2  # deploy/k8s/deployment.yaml's livenessProbe.timeoutSeconds


def limit_descriptors():
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (NOFILE, hard))


def connect(url: str, first: bytes) -> socket.socket | None:
    host, port = url.removeprefix("http://").split(":")
    try:
        sock = socket.create_connection((host, int(port)), timeout=5)
        if first:
            sock.sendall(first)
        return sock
    except OSError:  # refused or reset while the server makes room: part of the flood
        return None


def test_a_connection_flood_never_exhausts_descriptors_nor_blocks_the_probes(tiny_llama, tmp_path):
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 4 * NOFILE:
        pytest.skip(f"this test opens ~{2 * NOFILE} sockets itself; the hard descriptor limit is {hard}")
    package = add_tokenizer(tiny_llama.package, tmp_path / "pkg")
    proc, url, log_path = start_server(package, tmp_path, 5, preexec_fn=limit_descriptors)
    kinds = [b""] * 200 + [b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"] * 200 + \
        [b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 500\r\n\r\n{\"prompt\": "] * 50
    socks = []
    try:
        for first in kinds:
            socks.append(connect(url, first))
            if len(socks) % 50 == 0:  # all along the flood, the probes get in
                assert httpx.get(f"{url}/health", timeout=LIVENESS_TIMEOUT_S).status_code == 200
        for _ in range(5):
            assert httpx.get(f"{url}/health", timeout=LIVENESS_TIMEOUT_S).status_code == 200
        text = httpx.get(f"{url}/metrics", timeout=LIVENESS_TIMEOUT_S).text
        assert 'portable_infer_http_connections_dropped_total{reason="evicted"}' in text
    finally:
        for s in socks:
            if s is not None:
                s.close()
        stop_server(proc)
    log = log_path.read_text()
    assert "Traceback" not in log and "out of system resource" not in log, log[-3000:]
    assert "lowered" in log or "file-descriptor limit" in log, log[-3000:]  # max_connections was lowered
    assert len(log.splitlines()) < 60, log[-3000:]  # a few rate-limited lines, not one per event
