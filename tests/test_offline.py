"""The runtime never opens a network connection: load (bundle and directory) and generate offline."""

from __future__ import annotations

import socket
import subprocess
import sys
import textwrap

import pytest

import portable_infer
from portable_infer.package.bundle import pack


class NetworkUsed(AssertionError):
    pass


@pytest.fixture
def no_network(monkeypatch):
    """Any socket creation, connection or name lookup raises NetworkUsed."""
    def refuse(*args, **kwargs):
        raise NetworkUsed(f"network access attempted: {args[:2]!r}")

    monkeypatch.setattr(socket.socket, "__init__", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    with pytest.raises(NetworkUsed):  # the guard itself works
        socket.socket()


def test_load_and_generate_never_touch_the_network(tiny_text_package, tmp_path, monkeypatch, no_network):
    monkeypatch.setenv("PORTABLE_INFER_HOME", str(tmp_path / "home"))
    bundle = pack(tiny_text_package, tmp_path / "tiny.pinf")
    for path in (tiny_text_package, bundle):
        model = portable_infer.load(path, "cpu", intra_op_threads=1, low_memory=True)
        assert len(model.generate_ids([5, 6, 7], max_new_tokens=4)) == 4
        text = "".join(r.text for r in model.stream_generate("Hello", max_new_tokens=4, ignore_eos=True))
        assert isinstance(text, str)


GUARDED = textwrap.dedent("""
    import socket, sys
    def refuse(*a, **k):
        raise SystemExit("network access attempted")
    socket.socket.__init__ = refuse
    socket.socket.connect = refuse
    socket.create_connection = refuse
    socket.getaddrinfo = refuse
    import portable_infer  # import-time too: nothing may reach for the network
    m = portable_infer.load(sys.argv[1], "cpu", intra_op_threads=1)
    print(len(m.generate("Hello", max_new_tokens=4, ignore_eos=True)) >= 0)
""")


def _strace_works() -> bool:
    import shutil

    return bool(shutil.which("strace")) and subprocess.run(
        ["strace", "-qq", "-e", "trace=socket", "-o", "/dev/null", "true"], capture_output=True).returncode == 0


def test_fresh_process_import_load_generate_offline(tiny_text_package, tmp_path):
    """Python-level guard from before the import; with strace, no IP socket at all (native code too)."""
    bundle = pack(tiny_text_package, tmp_path / "tiny.pinf")
    env = {"PORTABLE_INFER_HOME": str(tmp_path / "home"), "HOME": str(tmp_path), "PATH": "/usr/bin:/bin"}
    log = tmp_path / "syscalls.txt"
    trace = ["strace", "-f", "-qq", "-e", "trace=socket,connect,sendto,sendmsg", "-o", str(log)] \
        if _strace_works() else []
    r = subprocess.run([*trace, sys.executable, "-c", GUARDED, str(bundle)], capture_output=True, text=True,
                       env=env, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "True"
    if trace:  # local AF_UNIX sockets (glibc's nscd lookups) are not network
        inet = [line for line in log.read_text().splitlines() if "AF_INET" in line or "AF_NETLINK" in line]
        assert not inet, inet[:5]
