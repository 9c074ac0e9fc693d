"""benchmarks/isa_mask.py: AVX-512 and AVX-VNNI hidden from CPUID in a process tree, so the AVX2
code paths of ONNX Runtime and numpy run on an AVX-512 CPU (issue 18's AVX2 measurements)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import isa_mask  # noqa: E402


def _maskable() -> None:
    if shutil.which("gcc") is None and shutil.which("cc") is None:
        pytest.skip("no C compiler to build the mask")
    if not isa_mask.faultable():
        pytest.skip("this CPU / hypervisor offers no CPUID faulting: the ISA cannot be masked here")


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-X", "faulthandler", "-c", code], env=isa_mask.environ("avx2"),
                          capture_output=True, text=True, timeout=120)


def test_unknown_level_is_refused():
    with pytest.raises(isa_mask.MaskError, match="unknown ISA mask 'avx512'"):
        isa_mask.environ("avx512")


def test_the_avx2_level_hides_avx512_and_avx_vnni_only():
    """isa_mask.hides: what a compile-time ISA choice (llama.cpp's build) must leave out under a mask."""
    hidden = [f for f in ("sse4_2", "avx", "avx2", "fma", "f16c", "avx_vnni", "avx512f", "avx512bw", "avx512vl",
                          "avx512_vnni", "avx512_bf16", "avx512_fp16") if isa_mask.hides("avx2", f)]
    assert hidden == ["avx_vnni", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "avx512_fp16"]
    assert not isa_mask.hides(None, "avx512f")


def test_a_masked_process_sees_avx2_and_no_avx512():
    _maskable()
    seen = isa_mask.check("avx2")
    assert seen["AVX2"] and seen["FMA3"] and not seen["AVX512F"] and not seen["AVX512VNNI"]
    # The runtime's own ISA reading (the tuning cache's key, every benchmark's CPU line) follows,
    # with ONNX Runtime loaded in the same process.
    proc = _run("import onnxruntime\nfrom portable_infer.engine import doctor, host\n"
                "print(' '.join(host.isa_flags()))\nprint(host.describe())\n"
                "print(doctor.format_doctor(doctor.doctor_report(onnxruntime, variants=[])))")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout.splitlines()
    flags, line = out[0], out[1]
    cpu = next(ln for ln in out if ln.startswith("CPU: "))
    assert "avx2" in flags.split()
    assert not [f for f in flags.split() if isa_mask.hides("avx2", f)], flags
    listed = Path("/proc/cpuinfo").read_text()
    if " avx512f " in listed:
        assert "hidden from this process: " in line and "avx512f" in line.split("hidden from this process: ")[1]
        assert "unusable here: " in cpu and "avx512f" in cpu.split("unusable here: ")[1], cpu


def test_a_real_fault_still_reaches_the_programs_own_handler():
    # Python's faulthandler installs its SIGSEGV handler after the mask's: it must still report a
    # real fault (and the process die of it), while CPUID faults keep being answered.
    _maskable()
    proc = _run("import ctypes\nfrom portable_infer.engine.host import dispatchable\n"
                "print('AVX512F', dispatchable()['AVX512F'], flush=True)\nctypes.string_at(0)")
    assert proc.stdout.strip() == "AVX512F False"
    assert proc.returncode == -11, (proc.returncode, proc.stderr)
    assert "Fatal Python error: Segmentation fault" in proc.stderr
