"""SIGTERM with requests in flight, on a real process: the runner as `portable-infer serve` runs it
(tests/_slow_serve.py: the tiny model, 50 ms a step, a 6 s shutdown period).

After the signal /ready answers 503 while the listener stays open, a new request gets a JSON
503, /health stays 200; the two requests that cannot finish within the period end cleanly (the
stream with an error event and [DONE], the other with a JSON 503), and the process exits, as
uvicorn does, by re-raising the signal. Every wait is bounded.
"""

from __future__ import annotations

import json
import re
import signal
import threading

import pytest

pytest.importorskip("torch")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

from _ops import WAIT_S, error_of, start_server, status, stop_server, wait_for  # noqa: E402
from _serving import add_tokenizer  # noqa: E402

PERIOD_S = 6  # drain 4.8 s; the requests below need 240 steps x 50 ms = 12 s
LONG = {"max_tokens": 240, "ignore_eos": True}


def running(url: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=WAIT_S).text
    return float(re.search(r"^portable_infer_requests_running (\S+)$", text, re.M).group(1))


def test_sigterm_drains_then_ends_requests_in_flight_cleanly(tiny_llama, tmp_path):
    package = add_tokenizer(tiny_llama.package, tmp_path / "pkg")
    proc, url, log_path = start_server(package, tmp_path, PERIOD_S)
    lines, outcome = [], {}

    def stream():
        with httpx.stream("POST", f"{url}/v1/completions", json={"prompt": "a story", "stream": True, **LONG},
                          timeout=WAIT_S) as r:
            outcome["stream_status"] = r.status_code
            for line in r.iter_lines():
                if line.startswith("data: "):
                    lines.append(line[len("data: "):])

    def plain():
        outcome["plain"] = httpx.post(f"{url}/v1/completions", json={"prompt": "a report", **LONG}, timeout=WAIT_S)

    try:
        threads = [threading.Thread(target=f, daemon=True) for f in (stream, plain)]
        for t in threads:
            t.start()
        wait_for(lambda: lines and running(url) == 2, "both requests to run")
        proc.send_signal(signal.SIGTERM)
        wait_for(lambda: status(f"{url}/ready") == 503, "/ready to answer 503")
        r = httpx.post(f"{url}/v1/completions", json={"prompt": "too late", "max_tokens": 2}, timeout=WAIT_S)
        assert r.status_code == 503 and error_of(r.text)["code"] == "server_shutting_down"
        assert r.headers["connection"] == "close"
        assert status(f"{url}/health") == 200
        for t in threads:
            t.join(WAIT_S)
            assert not t.is_alive()
        assert outcome["stream_status"] == 200 and lines[-1] == "[DONE]"
        assert error_of(lines[-2])["code"] == "server_shutting_down"
        assert all("choices" in json.loads(x) for x in lines[:-2])  # no cut chunk before the error
        r = outcome["plain"]
        assert r.status_code == 503 and r.headers["content-type"] == "application/json"
        assert error_of(r.text)["code"] == "server_shutting_down"
        proc.wait(WAIT_S)
    finally:
        stop_server(proc)
    text = log_path.read_text()
    assert proc.returncode in (0, -signal.SIGTERM), text
    assert "shutting down: /ready answers 503" in text and "Application shutdown complete" in text, text
    assert "Traceback" not in text and "timeout graceful shutdown exceeded" not in text, text
    assert status(f"{url}/health") is None
