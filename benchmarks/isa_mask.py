"""Run a command on this CPU's AVX2 code paths: AVX-512 (and AVX-VNNI) hidden from CPUID.

    .venv/bin/python benchmarks/isa_mask.py avx2 -- .venv/bin/python benchmarks/compare_cpu.py ...
    .venv/bin/python benchmarks/isa_mask.py --check avx2

Issue 18's targets must hold on AVX2 machines and on AVX-512 ones, and the session's machine is
whichever it is. ONNX Runtime (MLAS), GenAI (the same ONNX Runtime), numpy and ggml's all-variants
builds pick their kernels from CPUID at start-up. ``isa_mask.c``, compiled here with gcc into
``.bench/isa_mask/`` and preloaded into COMMAND and every process it starts, hides the extensions
from CPUID (CPUID faulting: Linux with ``cpuid_fault`` in /proc/cpuinfo), so those libraries take
the code paths an AVX2 CPU gets, on this CPU's cores, caches and memory. That is the kernel choice
of an AVX2 host, not its speed: an EPYC Zen 2/3 has other caches and clocks. Say so with every
number measured this way; ``portable_infer.engine.host.describe`` (every table's CPU line) names
the hidden flags.

The one level, ``avx2``, hides AVX-512 and AVX-VNNI (issue 18's AVX2/FMA/F16C EPYC); the masked
processes get ``ISA_MASK=avx2``, which ``host`` reads for AVX-VNNI (numpy does not report it).
Code compiled for AVX-512 still runs: llama.cpp must be a build that dispatches at run time
(``setup_competitors.py`` builds ``llamacpp-avx2`` for the mask).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "isa_mask.c"
BUILD = HERE.parent / ".bench" / "isa_mask"
# The variable the masked processes get (isa_mask.c reads it; so do setup_steps, the llama.cpp
# runner, which runs in its own venv, and portable_infer.engine.host.MASK_ENV).
ENV = "ISA_MASK"
LEVELS = {"avx2": "AVX-512 and AVX-VNNI hidden from CPUID (an AVX2/FMA/F16C CPU: EPYC Zen 2/3)"}


def hides(level: str | None, flag: str) -> bool:
    """Whether the mask ``level`` (None: no mask) hides the /proc/cpuinfo flag ``flag`` (isa_mask.c's
    bit masks, by the names /proc uses): for builds whose ISA is fixed at compile time."""
    return level == "avx2" and (flag.startswith("avx512") or flag == "avx_vnni")
# What a child process must then see: the runtime's own reading of CPUID (host.dispatchable).
_PROBE = (f"import json, sys; sys.path.insert(0, {str(HERE.parent)!r}); "
          "from portable_infer.engine.host import dispatchable; f = dispatchable(); "
          "print(json.dumps({k: bool(f.get(k)) for k in ('AVX2', 'FMA3', 'AVX512F', 'AVX512VNNI')}))")


class MaskError(RuntimeError):
    """The mask cannot run here (no gcc, no CPUID faulting) or did not take effect."""


def library() -> Path:
    """The compiled mask, built once per version of isa_mask.c."""
    digest = hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:12]
    out = BUILD / f"isa_mask-{digest}.so"
    if out.is_file():
        return out
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        raise MaskError("no C compiler (gcc or cc) to build benchmarks/isa_mask.c: install gcc")
    BUILD.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(f".{os.getpid()}.tmp")
    proc = subprocess.run([cc, "-O2", "-shared", "-fPIC", "-o", str(tmp), str(SOURCE)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise MaskError(f"building {SOURCE.name} failed:\n{proc.stderr}")
    tmp.replace(out)
    return out


def environ(level: str, base: dict | None = None) -> dict:
    """``base`` (default os.environ) with the mask preloaded at ``level``."""
    if level not in LEVELS:
        raise MaskError(f"unknown ISA mask {level!r}: one of {', '.join(LEVELS)}")
    env = dict(os.environ if base is None else base)
    preload = [str(library())] + [p for p in env.get("LD_PRELOAD", "").split(":") if p]
    env.update({ENV: level, "LD_PRELOAD": ":".join(preload)})
    return env


def faultable() -> bool:
    """Whether this CPU (or its hypervisor) offers CPUID faulting."""
    try:
        return any(ln.startswith("flags") and "cpuid_fault" in ln.split()
                   for ln in Path("/proc/cpuinfo").read_text().splitlines())
    except OSError:
        return False


def check(level: str) -> dict:
    """Start a child under the mask and confirm it sees AVX2 without AVX-512; its features."""
    if not faultable():
        raise MaskError("this CPU (or its hypervisor) offers no CPUID faulting (no cpuid_fault in "
                        "/proc/cpuinfo): the ISA cannot be masked here; measure on an AVX2 machine")
    proc = subprocess.run([sys.executable, "-c", _PROBE], env=environ(level), capture_output=True, text=True)
    if proc.returncode != 0:
        raise MaskError(f"a process under the mask failed (exit {proc.returncode}):\n{proc.stderr}")
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    if seen["AVX512F"] or not seen["AVX2"]:
        raise MaskError(f"the mask did not take effect: the child saw {seen}")
    return seen


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("level", choices=sorted(LEVELS))
    ap.add_argument("--check", action="store_true", help="only check that the mask works here")
    ap.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND [ARGS...]")
    args = ap.parse_args()
    cmd = args.command[1:] if args.command[:1] == ["--"] else args.command
    try:
        seen = check(args.level)
    except MaskError as exc:
        sys.exit(f"isa_mask: {exc}")
    print(f"isa_mask: {args.level}: {LEVELS[args.level]}; a child sees {seen}", file=sys.stderr, flush=True)
    if args.check:
        return
    if not cmd:
        sys.exit("isa_mask: no command: isa_mask.py LEVEL -- COMMAND [ARGS...]")
    os.execvpe(cmd[0], cmd, environ(args.level))


if __name__ == "__main__":
    main()
