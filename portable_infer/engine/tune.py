"""Measured variant choice: time the candidate graphs on this host, keep the fastest, remember it.

Hand-written rules ("int8 activations are faster", "static beats fused") hold on the machine they
were tuned on; the next machine differs (AVX2 without VNNI, AVX-512 VNNI, AMX, ARM dot products,
another ONNX Runtime). So the loader hands the variants that may run (each past its quality gate,
per the user's ``prefer``) to :func:`choose`, which times a few decode steps of each at the batch
sizes asked for and keeps the fastest. An exact variant within :data:`EXACT_MARGIN` of the fastest
wins over a less exact one: a few percent of noise never costs accuracy.

Decisions are cached on disk, keyed by everything that changes the answer (:class:`TuneKey`:
package digest, CPU model, ISA flags, ONNX Runtime version, provider, threads, batch sizes), so
a load on a known host times nothing. ``PORTABLE_INFER_TUNE=0`` turns measuring off (the
loader's rules decide); ``portable-infer tune PKG`` measures eagerly and prints the table.

The timing itself is a callable passed in (``time_variant(name, batch) -> seconds per step``),
so the decision logic is tested with faked timings and the same mechanism can choose between any
provider's variants (CUDA graphs on/off, OpenVINO precision hints) later.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from portable_infer.engine import host
from portable_infer.engine.devices import device_of

logger = logging.getLogger(__name__)

TUNE_ENV = "PORTABLE_INFER_TUNE"
CACHE_VERSION = 1
# An exact candidate this close to the fastest one is chosen over it (relative step time).
EXACT_MARGIN = 0.05


@dataclass(frozen=True)
class Candidate:
    """A variant that may run: its name and whether it is exact (float activations, source weights)."""

    name: str
    exact: bool


@dataclass(frozen=True)
class TuneKey:
    """Everything a measured choice depends on; a change in any field measures again."""

    package: str  # sha256 of manifest.json (which pins every file's sha256)
    cpu: str
    isa: tuple
    ort: str
    provider: str
    threads: int
    batches: tuple = (1,)
    prefer: str = "speed"
    candidates: tuple = ()
    device: str = ""  # the accelerator's model where the provider runs on one ("" on the CPU)

    def digest(self) -> str:
        text = json.dumps({"v": CACHE_VERSION, **asdict(self)}, sort_keys=True, default=list)
        return hashlib.sha256(text.encode()).hexdigest()[:32]


@dataclass(frozen=True)
class Decision:
    chosen: str
    timings_ms: dict = field(default_factory=dict)  # {variant: {batch: median ms per step}}
    measured: bool = True  # False: taken from the cache


FORCE = "force"  # PORTABLE_INFER_TUNE=force: measure again even where a decision is cached


def enabled() -> bool:
    return os.environ.get(TUNE_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def forced() -> bool:
    return os.environ.get(TUNE_ENV, "").strip().lower() == FORCE


def host_key(package_dir: Path, provider: str, threads: int, batches: Sequence[int], prefer: str,
             candidates: Sequence[Candidate], ort_version: str) -> TuneKey:
    """The key of a choice on this host; ``provider`` ONNX Runtime's name (a GPU's also names its model)."""
    manifest = Path(package_dir, "manifest.json").read_bytes()
    device = " / ".join(host.gpu_models()) if device_of(provider) == "cuda" else ""
    return TuneKey(package=hashlib.sha256(manifest).hexdigest(), cpu=host.cpu_model(),
                   isa=host.isa_flags(), ort=ort_version, provider=provider,
                   threads=threads or host.cpu_budget().threads, batches=tuple(batches), prefer=prefer,
                   candidates=tuple(c.name for c in candidates), device=device)


def score(timings_ms: dict, batches: Sequence[int]) -> dict:
    """One number per variant: its mean over batches of the step time relative to the fastest
    variant at that batch (1.0 = fastest everywhere), so no batch size dominates by its scale."""
    out = {name: 0.0 for name in timings_ms}
    for b in batches:
        best = min(t[b] for t in timings_ms.values())
        for name, t in timings_ms.items():
            out[name] += t[b] / best / len(batches)
    return out


def decide(candidates: Sequence[Candidate], timings_ms: dict, batches: Sequence[int]) -> str:
    """The fastest candidate by :func:`score`, except that an exact one within EXACT_MARGIN of it wins."""
    scores = score(timings_ms, batches)
    fastest = min(candidates, key=lambda c: (scores[c.name], not c.exact))
    exact = [c for c in candidates if c.exact and scores[c.name] <= scores[fastest.name] * (1 + EXACT_MARGIN)]
    return min(exact, key=lambda c: scores[c.name]).name if exact else fastest.name


def choose(candidates: Sequence[Candidate], time_variant: Callable[[str, int], float], key: TuneKey,
           cache_dir: Path | None, *, remeasure: bool = False) -> Decision:
    """The candidate to run: from the cache for ``key``, else measured with ``time_variant``."""
    if not candidates:
        raise ValueError("choose() needs at least one candidate")
    if len(candidates) == 1:
        return Decision(candidates[0].name, {}, measured=False)
    path = cache_dir / f"{key.digest()}.json" if cache_dir is not None else None
    if path is not None and not remeasure:
        cached = _read(path, candidates)
        if cached is not None:
            return cached
    timings = {c.name: {b: time_variant(c.name, b) * 1000.0 for b in key.batches} for c in candidates}
    decision = Decision(decide(candidates, timings, key.batches), timings)
    logger.info("measured variants on this host: %s -> %s", _fmt(timings), decision.chosen)
    if path is not None:
        _write(path, key, decision)
    return decision


def median_step_s(step: Callable[[], None], steps: int = 8, warmup: int = 2, warmup_s: float = 0.0,
                  warmup_max: int = 64) -> float:
    """Median wall time of ``step()`` after ``warmup`` calls, and more until ``warmup_s`` seconds
    have passed (``warmup_max`` at most: ``step()`` runs at most ``warmup_max + steps`` times; the
    timing primitive of the loaders)."""
    import time

    start = time.perf_counter()
    done = 0
    while done < warmup or (time.perf_counter() - start < warmup_s and done < warmup_max):
        step()
        done += 1
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _fmt(timings: dict) -> str:
    return ", ".join(f"{n} " + "/".join(f"{ms:.2f}" for ms in t.values()) + " ms" for n, t in timings.items())


def _read(path: Path, candidates: Sequence[Candidate]) -> Decision | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        chosen = data["chosen"]
        timings = {n: {int(b): float(ms) for b, ms in t.items()} for n, t in data["timings_ms"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None  # absent or damaged: measure again (and overwrite)
    if chosen not in {c.name for c in candidates}:
        return None
    return Decision(chosen, timings, measured=False)


def _write(path: Path, key: TuneKey, decision: Decision) -> None:
    """Atomically (a temp file renamed); a cache that cannot be written only costs a re-measure."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp-{os.getpid()}")
        tmp.write_text(json.dumps({"key": asdict(key), "chosen": decision.chosen,
                                   "timings_ms": decision.timings_ms}, indent=1, default=list), encoding="utf-8")
        os.replace(tmp, path)
    except OSError as exc:
        logger.warning("could not cache the variant choice in %s (%s); it is measured again next load",
                       path.parent, exc)


def cached_decisions(cache_dir: Path, package_dir: Path | None = None) -> list:
    """Every cached decision (for ``doctor`` and ``inspect``), optionally only one package's."""
    digest = None
    if package_dir is not None:
        try:
            digest = hashlib.sha256(Path(package_dir, "manifest.json").read_bytes()).hexdigest()
        except OSError:
            return []
    out = []
    for p in sorted(cache_dir.glob("*.json")) if cache_dir.is_dir() else []:
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
            if digest is None or data["key"]["package"] == digest:
                out.append(data)
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return out
