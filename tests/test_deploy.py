"""deploy/: the Kubernetes manifests agree with the server, and the image's CMD really serves.

The YAML is parsed and cross-checked (probe paths are routes of the app, ports agree, the HPA's
metric is one the server exports and the adapter rule exposes); then the Dockerfile's CMD runs
here as a subprocess, on loopback and against the tiny model, for one request.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
TIMEOUT_S = 60


def documents() -> dict:
    """kind -> the one object of that kind in deploy/k8s."""
    out = {}
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                assert doc["kind"] not in out, f"two {doc['kind']} objects"
                out[doc["kind"]] = doc
    return out


def docker_cmd() -> list:
    lines = DOCKERFILE.read_text().splitlines()
    cmds = [line[len("CMD"):].strip() for line in lines if line.startswith("CMD ")]
    assert len(cmds) == 1, "the Dockerfile needs exactly one CMD, in exec (JSON) form"
    return json.loads(cmds[0])


def flag(argv: list, name: str) -> str:
    return argv[argv.index(name) + 1]


@pytest.fixture(scope="module")
def k8s():
    return documents()


@pytest.fixture(scope="module")
def container(k8s):
    (c,) = k8s["Deployment"]["spec"]["template"]["spec"]["containers"]
    return c


@pytest.fixture(scope="module")
def served_app():
    """Routes and /metrics of a real app (over a fake scheduler: no model needed)."""
    from types import SimpleNamespace

    from fastapi.testclient import TestClient

    from portable_infer.serving.scheduler import SchedulerConfig, SchedulerStats
    from portable_infer.serving.http import ServerConfig, create_app

    stats = SchedulerStats(*([0] * 16))

    class FakeScheduler:
        model = SimpleNamespace(max_context=64, path=Path("pkg"), manifest=None)
        config = SchedulerConfig()
        alive = True
        row_limit = None  # KV tokens a request may hold: unbounded (a restacked batch)

        def add_observer(self, observer):
            pass

        def stats(self):
            return stats

        def has_capacity(self):
            return True

    app = create_app(FakeScheduler(), ServerConfig())
    with TestClient(app) as client:
        return SimpleNamespace(paths={r.path for r in app.routes}, metrics=client.get("/metrics").text)


def test_manifests_parse_and_have_the_kinds(k8s):
    assert {"Deployment", "Service", "HorizontalPodAutoscaler", "ConfigMap", "Kustomization"} <= set(k8s)
    listed = set(k8s["Kustomization"]["resources"])
    assert listed == {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    for kind, doc in k8s.items():
        assert doc.get("apiVersion") and doc.get("kind"), kind
        if kind != "Kustomization":
            assert doc["metadata"]["name"], kind


def test_deployment_runs_the_image_cmd_with_matching_probes(k8s, container, served_app):
    spec = k8s["Deployment"]["spec"]
    assert spec["selector"]["matchLabels"].items() <= spec["template"]["metadata"]["labels"].items()
    command = container["command"]
    assert command == docker_cmd(), "the Deployment's command drifted from the Dockerfile's CMD"
    assert command[:2] == ["portable-infer", "serve"] and flag(command, "--host") == "0.0.0.0"
    (port,) = container["ports"]
    assert port["containerPort"] == int(flag(command, "--port"))
    assert f"EXPOSE {port['containerPort']}" in DOCKERFILE.read_text()
    probes = {name: container[name]["httpGet"] for name in ("readinessProbe", "livenessProbe", "startupProbe")}
    assert probes["readinessProbe"]["path"] == "/ready" and probes["livenessProbe"]["path"] == "/health"
    for name, probe in probes.items():
        assert probe["path"] in served_app.paths, f"{name} probes {probe['path']}, which the server lacks"
        assert probe["port"] in (port["name"], port["containerPort"]), name
    annotations = spec["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/path"] in served_app.paths
    assert int(annotations["prometheus.io/port"]) == port["containerPort"]


def test_shutdown_period_matches_the_grace_period(k8s, container):
    """The server drains within its --shutdown-timeout (ServerConfig's default unless the command sets
    it); Kubernetes SIGKILLs after terminationGracePeriodSeconds: the first must fit the second, and
    the default is the shipped Deployment's, so neither drifts alone."""
    from portable_infer.serving.http import ServerConfig

    grace = k8s["Deployment"]["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    command = container["command"]
    default = ServerConfig().shutdown_timeout_s
    period = float(flag(command, "--shutdown-timeout")) if "--shutdown-timeout" in command else default
    assert period <= grace, f"--shutdown-timeout {period} outlasts terminationGracePeriodSeconds {grace}"
    assert default == grace, "ServerConfig.shutdown_timeout_s and the Deployment's grace period drifted apart"


def test_service_targets_the_container(k8s, container):
    svc = k8s["Service"]["spec"]
    assert svc["selector"].items() <= k8s["Deployment"]["spec"]["template"]["metadata"]["labels"].items()
    (port,) = svc["ports"]
    assert port["targetPort"] in (container["ports"][0]["name"], container["ports"][0]["containerPort"])


def test_hpa_scales_on_a_metric_the_server_exports(k8s, served_app):
    hpa = k8s["HorizontalPodAutoscaler"]
    assert hpa["apiVersion"] == "autoscaling/v2"
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", k8s["Deployment"]["metadata"]["name"])
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    (m,) = hpa["spec"]["metrics"]
    assert m["type"] == "Pods" and m["pods"]["target"]["type"] == "AverageValue"
    name = m["pods"]["metric"]["name"]
    assert re.search(rf"^# TYPE {name} gauge$", served_app.metrics, re.M), f"the server exports no {name}"
    # prometheus-adapter serves the scraped series under the same name
    (rule,) = yaml.safe_load(k8s["ConfigMap"]["data"]["config.yaml"])["rules"]
    assert rule["seriesQuery"].startswith(name + "{")
    assert re.sub(rule["name"]["matches"], rule["name"]["as"].replace("$", "\\"), name) == name
    assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_image_cmd_serves_one_request(tiny_llama, tmp_path):
    """The CMD as the container runs it, but on loopback, a free port and the tiny model."""
    from _serving import add_tokenizer

    package = add_tokenizer(tiny_llama.package, tmp_path / "pkg")
    argv = docker_cmd()
    port = free_port()
    for name, value in (("--host", "127.0.0.1"), ("--port", str(port)), ("--model", str(package))):
        argv[argv.index(name) + 1] = value
    exe = Path(sys.executable).parent / argv[0]
    if not exe.exists():
        pytest.skip(f"{argv[0]} is not installed next to {sys.executable}")
    env = {**os.environ, "PORTABLE_INFER_PROVIDERS": "cpu", "PORTABLE_INFER_HOME": str(tmp_path / "home")}
    env.pop("PORTABLE_INFER_API_KEY", None)
    proc = subprocess.Popen([str(exe), *argv[1:], "--threads", "2"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while True:
            assert proc.poll() is None, f"{shlex.join(argv)} exited:\n{proc.stdout.read()}"
            assert time.monotonic() < deadline, "the server did not become ready"
            try:
                if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        r = httpx.post(f"{url}/v1/completions", json={"model": "pkg", "prompt": "Hi", "max_tokens": 4,
                                                      "ignore_eos": True}, timeout=TIMEOUT_S)
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 4
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    log = proc.stdout.read()
    # uvicorn shuts down gracefully, then re-raises the signal it caught: exit status -SIGTERM
    assert proc.returncode in (0, -signal.SIGTERM), log
    assert "Application shutdown complete" in log, log
