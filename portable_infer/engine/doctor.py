"""``portable-infer doctor``: the ONNX Runtime install, what ``auto`` would pick and why, without sessions."""

from __future__ import annotations

import os
from typing import Any, Sequence

from portable_infer.engine import providers as P
from portable_infer.errors import InvalidArgumentError, ProviderError
from portable_infer.package.manifest import GraphVariant
from portable_infer.engine.variant_choice import choose_variant


def doctor_report(ort: Any = None, variants: Sequence[GraphVariant] | None = None) -> dict:
    """Plain data about the ONNX Runtime install and what ``auto`` would pick, without sessions.

    Returns:
        dict with ort_version, builds, build_conflict, available, unused_available, env_override,
        auto ({provider, ort_name, device, variant} or {error}), and providers: one row per
        table entry with key, ort_name, device, status ("picked"/"fallback"/"skipped"), reason
        and install_hint.
    """
    ort = ort if ort is not None else P.default_ort()
    version, available = ort.__version__, list(ort.get_available_providers())
    builds = P.installed_builds()
    try:
        specs, explicit = P.resolve_request("auto", version)
        error = None
    except (ProviderError, InvalidArgumentError) as exc:
        specs, explicit, error = [], True, str(exc)
    order = specs + ([P.CPU] if explicit and P.CPU not in specs else [])  # select_session's fallback
    reasons = {}
    for spec in P.PROVIDERS:
        reason = spec.unsupported_reason(version)
        if reason is None and spec.ort_name not in available:
            reason = "not in this ONNX Runtime build"
        if reason is None and spec not in order:
            reason = f"not in {P.ENV_VAR}" if explicit else spec.explicit_only
        if reason is None and variants is not None:
            v, why = choose_variant(spec, variants)
            reason = None if v else f"no suitable variant: {why}"
        reasons[spec.key] = reason
    usable = [s for s in order if reasons[s.key] is None]
    picked = usable[0] if usable else None
    rows = [{"key": s.key, "ort_name": s.ort_name, "device": s.device, "reason": reasons[s.key],
             "status": "picked" if s is picked else "fallback" if s in usable else "skipped",
             "install_hint": s.install_hint}
            for s in usable + [s for s in P.PROVIDERS if s not in usable]]
    variant = choose_variant(picked, variants)[0] if picked and variants is not None else None
    auto = ({"error": error} if error else {"error": "no usable provider"} if picked is None else
            {"provider": picked.key, "ort_name": picked.ort_name, "device": picked.device,
             "variant": variant.name if variant else None})
    known = {s.ort_name for s in P.PROVIDERS}
    from portable_infer.engine import host
    from portable_infer.engine.measure import tune_cache_dir
    from portable_infer.engine.tune import cached_decisions

    budget = host.cpu_budget()
    usable, hidden = host.isa_split()
    return {
        "cpu": host.cpu_model(), "isa": list(usable), "isa_hidden": list(hidden),
        "cpu_budget": {"affinity": budget.affinity, "physical": budget.physical, "quota": budget.quota,
                       "threads": budget.threads},
        "tuned": [{"chosen": d["chosen"], "timings_ms": d["timings_ms"], **d["key"]}
                  for d in cached_decisions(tune_cache_dir())],
        "ort_version": version, "ort_device": getattr(ort, "get_device", lambda: None)(),
        "builds": [list(b) for b in builds],
        "build_conflict": P.build_conflict_warning(builds), "available": available,
        "unused_available": [p for p in available if p not in known],
        "env_override": os.environ.get(P.ENV_VAR) or None,
        "auto": auto, "providers": rows,
    }


def format_doctor(report: dict) -> str:
    """Human-readable text of :func:`doctor_report` for ``portable-infer doctor``."""
    builds = ", ".join(f"{n} {v}" for n, v in report["builds"]) or "none found by pip metadata"
    auto = report["auto"]
    device = f", device {report['ort_device']}" if report.get("ort_device") else ""
    lines = [f"ONNX Runtime {report['ort_version']}{device} (installed builds: {builds})"]
    if "cpu" in report:
        b = report["cpu_budget"]
        hidden = report.get("isa_hidden")
        hidden = f" (listed by the CPU, unusable here: {' '.join(hidden)})" if hidden else ""
        lines.append(f"CPU: {report['cpu']}; ISA: {' '.join(report['isa']) or 'unknown'}{hidden}; "
                     f"{b['affinity']} CPUs, {b['physical']} cores, cgroup quota "
                     f"{'none' if b['quota'] is None else b['quota']} -> {b['threads']} threads")
    for t in report.get("tuned", []):
        lines.append(f"measured choice: {t['chosen']} on {t['provider']} ({t['threads']} threads, ORT {t['ort']}, "
                     f"package {t['package'][:12]}): " + ", ".join(
                         f"{n} " + "/".join(f"{ms:.2f}" for ms in by_b.values()) + " ms"
                         for n, by_b in t["timings_ms"].items()))
    if report["build_conflict"]:
        lines.append(f"WARNING: {report['build_conflict']}")
    lines.append(f"available providers: {', '.join(report['available'])}")
    if report["env_override"]:
        lines.append(f"{P.ENV_VAR}={report['env_override']} replaces the auto choice")
    if "error" in auto:
        lines.append(f"auto: ERROR {auto['error']}")
    else:
        variant = f", {auto['variant']} variant" if auto.get("variant") else ""
        lines.append(f"auto picks: {auto['provider']} ({auto['ort_name']}, {auto['device']}{variant})")
    lines.append("providers:")
    for row in report["providers"]:
        text = row["reason"] or ("used by auto" if row["status"] == "picked" else "auto's next choice")
        if row["reason"] == "not in this ONNX Runtime build":
            text += f"; to get it: {row['install_hint']}"
        lines.append(f"  {row['key']:<14}{row['status']:<10}{row['device']:<34}{text}")
    if report["unused_available"]:
        lines.append(f"not used by portable_infer: {', '.join(report['unused_available'])}")
    return "\n".join(lines)
