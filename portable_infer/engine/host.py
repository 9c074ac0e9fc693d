"""What this host offers a decode: the CPU model, its ISA flags and the real CPU budget.

The budget is what the process may really use, not the host's core count: the CPUs in its
affinity mask (``os.sched_getaffinity``), their physical cores (SMT siblings count once, as ONNX
Runtime counts them), and a cgroup CPU quota (v2 ``cpu.max``, v1 ``cpu.cfs_quota_us`` /
``cpu.cfs_period_us``, the tightest along the process's cgroup path). A container limited to
2 CPUs on a 64-core host gets 2 threads, not 64 threads time-sliced into 2 CPUs' worth.

Every function takes ``root`` (default ``/``) so tests run them on a faked ``/proc`` and ``/sys``.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

# The flags that decide which ONNX Runtime (MLAS) kernels run, in the order they are printed.
ISA_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx_vnni", "avx512f", "avx512bw", "avx512vl",
             "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_int8", "amx_bf16",
             "asimd", "asimddp", "i8mm", "sve", "sve2", "bf16")


@dataclass(frozen=True)
class CpuBudget:
    """The CPUs this process may use, and the intra-op thread count that follows from them."""

    affinity: int  # logical CPUs in the affinity mask
    physical: int  # physical cores among them (SMT siblings once)
    quota: float | None  # cgroup CPU quota in CPUs (None: unlimited)

    @property
    def threads(self) -> int:
        """One thread per physical core, never more than the quota allows (at least 1)."""
        n = self.physical
        if self.quota is not None:
            n = min(n, max(1, math.floor(self.quota + 1e-9)))
        return max(1, n)


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError):
        return None


def cpuinfo(root: str | os.PathLike = "/") -> dict:
    """The first processor block of /proc/cpuinfo as a dict (empty where unreadable)."""
    text = _read(Path(root, "proc/cpuinfo")) or ""
    out: dict = {}
    for line in text.splitlines():
        if not line.strip():
            if out:
                break
            continue
        key, _, value = line.partition(":")
        out.setdefault(key.strip(), value.strip())
    return out


def cpu_model(root: str | os.PathLike = "/") -> str:
    info = cpuinfo(root)
    return info.get("model name") or info.get("Hardware") or info.get("CPU part") or "unknown CPU"


# /proc/cpuinfo's flag -> numpy's name for the same feature. numpy reads CPUID and the OS's saved
# register state at import, as ONNX Runtime's kernels do: what code in this process can dispatch
# to. /proc lists what the CPU has; where numpy says a feature is unusable (a hypervisor or
# benchmarks/isa_mask.py hiding it from CPUID), the kernels do not use it and neither do we.
_NUMPY_NAMES = {"sse4_2": "SSE42", "avx": "AVX", "avx2": "AVX2", "fma": "FMA3", "f16c": "F16C",
                "avx512f": "AVX512F", "avx512bw": "AVX512BW", "avx512vl": "AVX512VL",
                "avx512_vnni": "AVX512VNNI", "avx512_bf16": "AVX512BF16", "avx512_fp16": "AVX512FP16",
                "asimd": "ASIMD", "asimddp": "ASIMDDP", "avx_vnni": "AVX_VNNI"}
# Set by benchmarks/isa_mask.py in the processes whose CPUID it masks; "avx2" also hides AVX-VNNI,
# which numpy does not report.
MASK_ENV = "ISA_MASK"


def dispatchable() -> dict:
    """numpy's CPU features of this process ({} where this numpy does not say), and AVX-VNNI off
    under isa_mask's ``avx2``."""
    try:
        from numpy._core._multiarray_umath import __cpu_features__
    except ImportError:
        try:
            from numpy.core._multiarray_umath import __cpu_features__
        except ImportError:
            __cpu_features__ = {}
    features = dict(__cpu_features__)
    if os.environ.get(MASK_ENV) == "avx2":
        features["AVX_VNNI"] = False
    return features


def listed_flags(root: str | os.PathLike = "/") -> tuple:
    """The kernel-relevant ISA flags the CPU lists (x86 `flags`, ARM `Features`), in ISA_FLAGS order."""
    info = cpuinfo(root)
    have = set((info.get("flags") or info.get("Features") or "").split())
    return tuple(f for f in ISA_FLAGS if f in have)


def isa_split(root: str | os.PathLike = "/", features: dict | None = None) -> tuple:
    """``(usable, hidden)``: the listed flags this process can dispatch to, and those ``features``
    (default: numpy's, for the real root; none for a faked one) marks unusable."""
    if features is None:
        features = dispatchable() if str(root) == "/" else {}
    listed = listed_flags(root)
    usable = tuple(f for f in listed if features.get(_NUMPY_NAMES.get(f, "")) is not False)
    return usable, tuple(f for f in listed if f not in usable)


def isa_flags(root: str | os.PathLike = "/", features: dict | None = None) -> tuple:
    """The listed flags this process can dispatch to (:func:`isa_split`)."""
    return isa_split(root, features)[0]


def hidden_flags(root: str | os.PathLike = "/", features: dict | None = None) -> tuple:
    """The flags the CPU lists that this process cannot use (:func:`isa_split`)."""
    return isa_split(root, features)[1]


def gpu_models(root: str | os.PathLike = "/") -> tuple:
    """The NVIDIA GPUs' model names the driver lists (/proc/driver/nvidia), () where none or unreadable."""
    out = []
    for info in sorted(Path(root, "proc/driver/nvidia/gpus").glob("*/information")):
        for line in (_read(info) or "").splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "Model":
                out.append(value.strip())
    return tuple(out)


def _affinity(root: Path) -> list:
    if str(root) == "/" and hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    text = _read(root / "proc/self/status") or ""
    for line in text.splitlines():
        if line.startswith("Cpus_allowed_list:"):
            return _parse_cpu_list(line.split(":", 1)[1])
    return list(range(os.cpu_count() or 1))


def _parse_cpu_list(text: str) -> list:
    cpus: list = []
    for part in text.strip().split(","):
        if not part.strip():
            continue
        lo, _, hi = part.partition("-")
        cpus.extend(range(int(lo), int(hi or lo) + 1))
    return cpus


def _physical(cpus: list, root: Path) -> int:
    """Physical cores among ``cpus``: each SMT sibling group counted once (unknown topology: each CPU)."""
    groups = set()
    for cpu in cpus:
        sib = _read(root / f"sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list")
        groups.add(tuple(_parse_cpu_list(sib)) if sib else (cpu,))
    return max(1, len(groups))


def _cgroup_paths(root: Path) -> tuple:
    """(v2 path or None, v1 cpu-controller path or None) of this process, from /proc/self/cgroup."""
    v2 = v1 = None
    for line in (_read(root / "proc/self/cgroup") or "").splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        if parts[0] == "0" and parts[1] == "":
            v2 = parts[2]
        elif "cpu" in parts[1].split(","):
            v1 = parts[2]
    return v2, v1


def _along(base: Path, cg_path: str):
    """``base/<cg_path>``, then each parent up to ``base`` itself (limits nest; the tightest wins)."""
    rel = Path(cg_path.lstrip("/"))
    return [base / p for p in (rel, *rel.parents)]


def _quota_v2(root: Path, cg_path: str) -> float | None:
    quotas = []
    for d in _along(root / "sys/fs/cgroup", cg_path):
        fields = (_read(d / "cpu.max") or "").split()
        if len(fields) >= 2 and fields[0] != "max" and float(fields[1]) > 0:
            quotas.append(float(fields[0]) / float(fields[1]))
    return min(quotas) if quotas else None


def _quota_v1(root: Path, cg_path: str) -> float | None:
    quotas = []
    for mount in ("sys/fs/cgroup/cpu,cpuacct", "sys/fs/cgroup/cpu", "sys/fs/cgroup/cpuacct,cpu"):
        for d in _along(root / mount, cg_path):
            q, p = _read(d / "cpu.cfs_quota_us"), _read(d / "cpu.cfs_period_us")
            if q and p and int(q) > 0 and int(p) > 0:
                quotas.append(int(q) / int(p))
        if quotas:
            break
    return min(quotas) if quotas else None


def cpu_budget(root: str | os.PathLike = "/") -> CpuBudget:
    """The CPUs this process may really use (affinity, physical cores, cgroup v1/v2 quota)."""
    root = Path(root)
    cpus = _affinity(root)
    v2, v1 = _cgroup_paths(root)
    quota = None
    try:
        if v2 is not None:
            quota = _quota_v2(root, v2)
        if quota is None and v1 is not None:
            quota = _quota_v1(root, v1)
    except (ValueError, IndexError):  # a malformed control file: no quota rather than a crash
        quota = None
    return CpuBudget(affinity=len(cpus), physical=_physical(cpus, root), quota=quota)


def available_memory(root: str | os.PathLike = "/") -> int | None:
    """Bytes this process may still take: the host's MemAvailable, or less where a cgroup v2
    ``memory.max`` along the process's cgroup path leaves less above its ``memory.current``
    (None: unreadable)."""
    root = Path(root)
    sizes = []
    for line in (_read(root / "proc/meminfo") or "").splitlines():
        if line.startswith("MemAvailable:"):
            sizes.append(int(line.split()[1]) * 1024)
    v2, _ = _cgroup_paths(root)
    if v2 is not None:
        for d in _along(root / "sys/fs/cgroup", v2):
            limit, used = _read(d / "memory.max"), _read(d / "memory.current")
            if limit and used and limit.strip().isdigit() and used.strip().isdigit():
                sizes.append(max(0, int(limit) - int(used)))
    return min(sizes) if sizes else None


def describe(root: str | os.PathLike = "/", features: dict | None = None) -> str:
    """One line for benchmark tables and `doctor`: model, ISA flags (and any the CPU lists that this
    process cannot use), budget."""
    b = cpu_budget(root)
    quota = "none" if b.quota is None else f"{b.quota:g}"
    usable, hidden = isa_split(root, features)
    hidden_text = f" | hidden from this process: {' '.join(hidden)}" if hidden else ""
    return (f"{cpu_model(root)} | ISA: {' '.join(usable) or 'unknown'}{hidden_text} | "
            f"{b.affinity} CPUs, {b.physical} cores, quota {quota} -> {b.threads} threads")
