"""Free and total memory of the GPU an engine runs on, read where ONNX Runtime's CUDA provider
allocates: the CUDA runtime library it loaded into this process (``cudaMemGetInfo``).

The serving KV budget is sized from it (``serving.kv_budget``), as vLLM sizes its cache from
``gpu_memory_utilization``. Nothing here loads a CUDA library of its own: a process whose CUDA
provider never ran has no runtime loaded, and the answer is None (the caller then keeps its fixed
default and says so).
"""

from __future__ import annotations

import ctypes
from pathlib import Path

_RUNTIME = "libcudart.so"  # the CUDA runtime (Linux); cudart64_*.dll on Windows is not looked for


def loaded_runtime(maps: str | None = None) -> str | None:
    """Path of the CUDA runtime library this process has loaded (from ``/proc/self/maps``, or the
    text ``maps``), or None."""
    if maps is None:
        try:
            maps = Path("/proc/self/maps").read_text()
        except OSError:
            return None
    for line in maps.splitlines():
        fields = line.split(maxsplit=5)  # address perms offset dev inode [path]
        if len(fields) == 6 and Path(fields[5].strip()).name.startswith(_RUNTIME):
            return fields[5].strip()
    return None


def cuda_memory(device_id: int = 0, runtime=None) -> tuple[int, int] | None:
    """``(free, total)`` bytes of CUDA device ``device_id`` as the runtime sees it now, or None where
    no CUDA runtime is loaded or it answers an error. ``runtime``: a loaded library (tests give a
    stand-in); default the one :func:`loaded_runtime` finds. The calling thread's current device is
    put back afterwards."""
    if runtime is None:
        path = loaded_runtime()
        if path is None:
            return None
        try:
            runtime = ctypes.CDLL(path)
        except OSError:
            return None
    current, free, total = ctypes.c_int(0), ctypes.c_size_t(0), ctypes.c_size_t(0)
    if runtime.cudaGetDevice(ctypes.byref(current)) != 0:
        return None
    try:
        if runtime.cudaSetDevice(ctypes.c_int(device_id)) != 0:
            return None
        if runtime.cudaMemGetInfo(ctypes.byref(free), ctypes.byref(total)) != 0:
            return None
    finally:
        runtime.cudaSetDevice(current)
    return int(free.value), int(total.value)


def session_device_id(session, provider: str) -> int:
    """The device id ``session`` runs ``provider`` on (its provider options; 0 where none say)."""
    try:
        return int(session.get_provider_options().get(provider, {}).get("device_id", 0))
    except (AttributeError, TypeError, ValueError):
        return 0
