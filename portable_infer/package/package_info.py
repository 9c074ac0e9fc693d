"""``portable-infer inspect``: what a package directory or ``.pinf`` bundle holds, in human terms.

A bundle is checked as ``load`` checks it before unpacking (member names, manifest schema and
paths, members == files[], the signature when ``trust`` is given) and is not unpacked.
"""

from __future__ import annotations

from pathlib import Path

from portable_infer.package.manifest import Manifest
from portable_infer.package.variants import gate_text, is_int8_name, recorded_past_gate
from portable_infer.package.verification import VariantReport


def describe(path, trust=None) -> str:
    """The lines ``portable-infer inspect PATH`` prints (raises PackageError on a bad package)."""
    path = Path(path)
    head = []
    if path.is_file() or trust is not None:
        from portable_infer.package.bundle import inspect_bundle

        info = inspect_bundle(path, trust)
        m = info.manifest
        signed = ("signed, signature checked" if trust is not None else
                  "signed, signature not checked (pass --trust)" if info.signed else "unsigned")
        head.append(f"bundle       {path} ({signed}), unpacks to bundles/{info.key[:16]}...")
    else:
        m = Manifest.load(path)
        head.append(f"package      {path}")
    d = m.model
    lines = head + [
        f"model        {d.model_type} (family {d.architecture}), {d.num_layers} layers, hidden {d.hidden_size}",
        f"attention    {d.num_heads} heads, {d.num_kv_heads} kv heads, head_dim {d.head_dim}, "
        f"rope theta {d.rope_theta}" + (f", sliding window {d.sliding_window}" if d.sliding_window else ""),
        f"vocab        {d.vocab_size}, max context {d.max_context}, tied embeddings {d.tie_word_embeddings}",
        f"precision    {m.precision}",
        f"source       {m.source.get('kind')} {m.source.get('path')}",
        f"exporter     {m.exporter_version}, schema {m.schema_version}",
    ]
    for v in m.variants:
        lines.append(f"variant      {v.name}: {v.file}, opset {v.opset}, domains {list(v.domains) or ['ai.onnx']}, "
                     f"providers {list(v.providers)}, KV {v.kv.layout} {v.kv.dtype} ({v.kv.growth})"
                     + (f", {v.precision} weights in blocks of {v.weight_block} (narrower rows: the largest halving that divides them)" if v.weight_block else "")
                     + (", int4 weights symmetric (no zero points)" if v.weight_symmetric else ""))
    size = sum(f.size for f in m.files)
    lines.append(f"files        {len(m.files)} files, {size / 2**20:.1f} MiB")
    lines += [_verified(name, r, m.verification) for name, r in m.verification.items()]
    return "\n".join(lines + _measured(path))


def _measured(path: Path) -> list:
    """This host (CPU, ISA flags) and the variant choices measured on it for this package."""
    from portable_infer.engine import host
    from portable_infer.engine.measure import tune_cache_dir
    from portable_infer.engine.tune import cached_decisions

    lines = [f"host         {host.describe()}"]
    for d in cached_decisions(tune_cache_dir(), path) if path.is_dir() else []:
        k = d["key"]
        times = ", ".join(f"{n} " + "/".join(f"{ms:.2f}" for ms in t.values()) + " ms"
                          for n, t in d["timings_ms"].items())
        lines.append(f"measured     {d['chosen']} on {k['provider']} ({k['threads']} threads, batches "
                     f"{k['batches']}, prefer {k['prefer']}, ORT {k['ort']}): {times}")
    if len(lines) == 1:
        lines.append("measured     no variant choice cached on this host (`portable-infer tune` measures)")
    return lines


def _verified(name: str, r: VariantReport, verification: dict | None = None) -> str:
    """One ``verified`` line from the export report ``r`` of ``name`` (``verification``: every
    variant's, which an int8 variant's gate reads its exact twin's from); any of its records may be
    absent."""
    parts = []
    if r.full is not None:
        parts.append(f"max rel diff {r.full.max_rel:.2e}")
    if r.greedy is not None:
        parts.append(f"greedy {r.greedy.identical_prefix}/{r.greedy.steps}")
    if r.quality is not None:
        parts.append(f"top-1 {r.quality.agree_steps}")
    if r.agreement is not None:  # lean verification, token by token
        parts.append(f"top-1 {r.agreement.agree_steps} (lean)")
    if r.reference_logits is not None:  # lean verification: shipped top-k logits
        parts.append(f"max rel diff {r.reference_logits.max_rel:.2e} vs shipped logits")
    if r.quality is not None and r.quality.perplexity is not None:
        parts.append(f"ppl {r.quality.perplexity:.3f}")
    note = ""
    if r.dropped:
        note = f"; left out of the package: {r.dropped}"
    elif is_int8_name(name) and r.quality is not None:
        note = ("; runs by default" if recorded_past_gate(verification or {name: r}, name) else
                f"; below the quality gate ({gate_text()}): runs only with --accuracy 4")
    return f"verified     {name}: {', '.join(parts) or 'no measurements'}{note}"
