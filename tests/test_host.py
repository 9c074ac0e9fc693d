"""The CPU budget from faked /proc and /sys trees: affinity, SMT siblings, cgroup v1/v2 quotas."""

from __future__ import annotations

from pathlib import Path

import pytest

from portable_infer.engine import host

CPUINFO = """processor\t: 0
model name\t: Fake EPYC 7B13
flags\t\t: fpu sse4_2 avx avx2 fma f16c

processor\t: 1
model name\t: Fake EPYC 7B13
flags\t\t: fpu sse4_2 avx avx2 fma f16c
"""


def fake_root(tmp_path: Path, cpus: str, cgroup: str, files: dict, siblings: dict | None = None) -> Path:
    root = tmp_path / "root"
    (root / "proc/self").mkdir(parents=True)
    (root / "proc/cpuinfo").write_text(CPUINFO)
    (root / "proc/self/status").write_text(f"Name:\tpython\nCpus_allowed_list:\t{cpus}\n")
    (root / "proc/self/cgroup").write_text(cgroup)
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    for cpu, sib in (siblings or {}).items():
        p = root / f"sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(sib + "\n")
    return root


def test_cgroup_v2_quota_limits_threads(tmp_path):
    root = fake_root(tmp_path, "0-15", "0::/kubepods/pod1/ctr\n",
                     {"sys/fs/cgroup/kubepods/pod1/ctr/cpu.max": "250000 100000\n",
                      "sys/fs/cgroup/kubepods/cpu.max": "max 100000\n"})
    b = host.cpu_budget(root)
    assert (b.affinity, b.physical, b.quota) == (16, 16, 2.5)
    assert b.threads == 2


def test_cgroup_v2_tightest_parent_wins(tmp_path):
    root = fake_root(tmp_path, "0-7", "0::/a/b\n",
                     {"sys/fs/cgroup/a/b/cpu.max": "max 100000\n",
                      "sys/fs/cgroup/a/cpu.max": "300000 100000\n"})
    assert host.cpu_budget(root).threads == 3


def test_cgroup_v1_quota(tmp_path):
    root = fake_root(tmp_path, "0-7", "4:cpu,cpuacct:/docker/abc\n3:memory:/docker/abc\n",
                     {"sys/fs/cgroup/cpu,cpuacct/docker/abc/cpu.cfs_quota_us": "150000\n",
                      "sys/fs/cgroup/cpu,cpuacct/docker/abc/cpu.cfs_period_us": "100000\n"})
    b = host.cpu_budget(root)
    assert b.quota == 1.5 and b.threads == 1


def test_cgroup_v1_unlimited(tmp_path):
    root = fake_root(tmp_path, "0-3", "4:cpu,cpuacct:/\n",
                     {"sys/fs/cgroup/cpu,cpuacct/cpu.cfs_quota_us": "-1\n",
                      "sys/fs/cgroup/cpu,cpuacct/cpu.cfs_period_us": "100000\n"})
    b = host.cpu_budget(root)
    assert b.quota is None and b.threads == 4


def test_smt_siblings_count_once_and_affinity_limits(tmp_path):
    sib = {c: f"{c - c % 2}-{c - c % 2 + 1}" for c in range(8)}  # pairs (0,1), (2,3), ...
    root = fake_root(tmp_path, "0-5", "0::/\n", {}, siblings=sib)
    b = host.cpu_budget(root)
    assert (b.affinity, b.physical, b.threads) == (6, 3, 3)


def test_malformed_control_file_means_no_quota(tmp_path):
    root = fake_root(tmp_path, "0-1", "0::/x\n", {"sys/fs/cgroup/x/cpu.max": "lots 100000\n"})
    assert host.cpu_budget(root).quota is None


def test_isa_flags_and_model(tmp_path):
    root = fake_root(tmp_path, "0", "0::/\n", {})
    assert host.cpu_model(root) == "Fake EPYC 7B13"
    assert host.isa_flags(root) == ("sse4_2", "avx", "avx2", "fma", "f16c")
    assert "avx512f" not in host.describe(root)


def test_sessions_use_the_budget(monkeypatch):
    ort = pytest.importorskip("onnxruntime")
    from portable_infer.engine.session import SessionConfig

    monkeypatch.setattr(host, "cpu_budget", lambda root="/": host.CpuBudget(8, 8, 3.0))
    assert SessionConfig().session_options(ort).intra_op_num_threads == 3
    assert SessionConfig(intra_op_threads=5).session_options(ort).intra_op_num_threads == 5


def test_gpu_models_from_the_driver(tmp_path):
    assert host.gpu_models(tmp_path) == ()  # no driver: none
    for bus, model in (("0000:01:00.0", "NVIDIA H200"), ("0000:02:00.0", "NVIDIA H100 80GB HBM3")):
        info = tmp_path / "proc/driver/nvidia/gpus" / bus / "information"
        info.parent.mkdir(parents=True)
        info.write_text(f"Model: \t\t {model}\nIRQ:   \t\t 42\nGPU UUID: \t GPU-x\n")
    assert host.gpu_models(tmp_path) == ("NVIDIA H200", "NVIDIA H100 80GB HBM3")


def test_flags_this_process_cannot_use_are_left_out(tmp_path):
    # /proc lists what the CPU has; numpy's CPUID reading says what code here can dispatch to (a
    # hypervisor, or benchmarks/isa_mask.py, may hide AVX-512 from CPUID).
    root = fake_root(tmp_path, "0", "0::/\n", {})
    (root / "proc/cpuinfo").write_text(CPUINFO.replace("f16c", "f16c avx512f avx512bw avx512_vnni"))
    assert host.isa_flags(root) == ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni")
    hidden = {"AVX2": True, "AVX512F": False, "AVX512BW": False, "AVX512VNNI": False}
    assert host.isa_flags(root, hidden) == ("sse4_2", "avx", "avx2", "fma", "f16c")
    line = host.describe(root, hidden)
    assert "ISA: sse4_2 avx avx2 fma f16c | hidden from this process: avx512f avx512bw avx512_vnni |" in line
    assert "hidden" not in host.describe(root)
