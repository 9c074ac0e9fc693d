"""Hugging Face Hub ids as export sources: ``org/name`` (config, safetensors, tokenizer files) or
``org/name:QUANT`` (the one GGUF file of the repo whose name carries that quant, e.g. Q4_K_M).

Files are fetched (or found in the local cache) by ``huggingface_hub``, which honours ``HF_TOKEN``,
``HF_HOME``/``HF_HUB_CACHE`` and ``HF_HUB_OFFLINE`` itself. Only the exporter comes here: the runtime
never touches the network. A string that names an existing local path never reaches this module.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from portable_infer.errors import DependencyError, SourceError

logger = logging.getLogger(__name__)

# What an HF-folder export reads (sources.py, hf_source.py, awq_gptq.py); nothing else is fetched.
# The weights: the shards the index lists where there is one (a repo may also hold other
# *.safetensors, e.g. Mistral's consolidated.safetensors), else every *.safetensors.
INDEX = "model.safetensors.index.json"
ALLOW_PATTERNS = ("config.json", "generation_config.json", INDEX, "tokenizer.json", "tokenizer_config.json",
                  "special_tokens_map.json", "chat_template.jinja", "quantize_config.json", "quant_config.json")
# org/name, optionally :QUANT; names as the Hub allows them (letters, digits, - _ .)
_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+?)(?::(?P<quant>[\w.-]+))?$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
_SPLIT = re.compile(r"-\d{5}-of-\d{5}\.gguf$", re.IGNORECASE)


def parse_id(source: str) -> tuple[str, str | None] | None:
    """(repo, quant) for a Hub id such as ``org/name`` or ``org/name:Q4_K_M``; None otherwise."""
    m = _ID.match(source)
    if m is None or source.lower().endswith(".gguf") or ".." in source:
        return None
    return m.group("repo"), m.group("quant")


def resolve(source: str, revision: str | None = None) -> Path:
    """The local folder (or GGUF file) for a Hub id: downloaded, or taken from the cache.

    Raises:
        SourceError: the id, revision or file is not there, or the Hub cannot be reached and the
            cache lacks it; the message says what to do.
        DependencyError: huggingface_hub is not installed.
    """
    repo, quant = parse_id(source) or (None, None)
    if repo is None:
        raise SourceError(f"{source!r} is not a Hugging Face Hub id (org/name or org/name:QUANT)",
                          param="source", reason="invalid")
    hub = _hub()
    try:
        if quant is not None:
            return _gguf(hub, repo, quant, revision)
        folder = Path(hub.snapshot_download(repo, revision=revision, allow_patterns=list(ALLOW_PATTERNS)))
        weights = _shards(folder / INDEX) if (folder / INDEX).is_file() else ["*.safetensors"]
        commit = folder.name if _COMMIT.match(folder.name) else revision  # the snapshot the first call got
        folder = Path(hub.snapshot_download(repo, revision=commit, allow_patterns=weights))
    except _failures(hub) as exc:  # huggingface_hub's errors, mapped to what the user can do
        raise _explain(hub, exc, repo, revision) from exc
    if not (folder / "config.json").is_file():
        raise SourceError(
            f"{repo} (revision {revision or 'main'}) has no config.json: it is not a transformers model "
            f"repo. For a GGUF repo name the file's quant, e.g. {repo}:Q4_K_M", param="source", reason="not_found")
    logger.info("%s -> %s", source, folder)
    return folder


def _shards(index: Path) -> list[str]:
    import json

    try:
        return sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
    except (json.JSONDecodeError, KeyError, AttributeError) as exc:
        raise SourceError(f"{index} is not a valid safetensors index ({exc}); re-download it") from exc


def _hub():
    try:
        import huggingface_hub
        import huggingface_hub.constants
        import huggingface_hub.errors  # noqa: F401  (submodules the lazy package does not expose)
    except ImportError as exc:
        raise DependencyError('Hugging Face Hub ids need huggingface_hub: pip install "portable-infer[lean]" '
                              '(or pass a local model folder or .gguf file)') from exc
    return huggingface_hub


def _gguf(hub, repo: str, quant: str, revision: str | None) -> Path:
    """The one .gguf file of ``repo`` whose name carries ``quant`` as a whole word."""
    if hub.constants.HF_HUB_OFFLINE:
        folder = Path(hub.snapshot_download(repo, revision=revision, allow_patterns=["*.gguf"]))
        files = [str(p.relative_to(folder)) for p in folder.rglob("*.gguf")]
    else:
        files = [f for f in hub.list_repo_files(repo, revision=revision) if f.lower().endswith(".gguf")]
    name = pick_gguf(files, quant, repo)
    return Path(hub.hf_hub_download(repo, name, revision=revision))


def pick_gguf(files: list[str], quant: str, repo: str) -> str:
    """The file whose name holds ``quant`` bounded by non-word characters (case-insensitive):
    ``Q4_K`` does not pick ``x-Q4_K_M.gguf``. Split files (``-00001-of-00003``) are refused."""
    word = re.compile(rf"(?<![A-Za-z0-9_]){re.escape(quant)}(?![A-Za-z0-9_])", re.IGNORECASE)
    hits = sorted(f for f in files if word.search(Path(f).name))
    ggufs = sorted(files)
    if not hits:
        raise SourceError(f"no GGUF file of {repo} carries {quant!r}; its GGUF files: {ggufs or 'none'}. "
                          f"Pick one of their quants (e.g. {repo}:Q4_K_M)", param="quant", reason="not_found")
    if len(hits) > 1:
        raise SourceError(f"{len(hits)} GGUF files of {repo} carry {quant!r}: {hits}; name the quant more "
                          f"precisely", param="quant", reason="ambiguous")
    if _SPLIT.search(hits[0]):
        raise SourceError(f"{hits[0]} is one part of a split GGUF, which is not read; merge the parts "
                          f"(llama-gguf-split --merge) and export the merged file", param="quant",
                          reason="unsupported")
    return hits[0]


def _failures(hub) -> tuple:
    """The exception types huggingface_hub raises for a missing, unreachable or refused repo/file
    (its HTTP errors derive from requests' or httpx's HTTPError, depending on its version)."""
    errors = hub.errors
    return (OSError, ValueError, errors.EntryNotFoundError, errors.HfHubHTTPError,
            getattr(errors, "HTTPError", OSError))


def _explain(hub, exc: Exception, repo: str, revision: str | None) -> SourceError:
    """A SourceError for a huggingface_hub failure that says what to do."""
    errors = hub.errors
    rev = revision or "main"
    if isinstance(exc, errors.RevisionNotFoundError):
        return SourceError(f"{repo} has no revision {rev!r}; check --revision (a branch, tag or commit)",
                           param="revision", reason="not_found")
    if isinstance(exc, errors.GatedRepoError):
        return SourceError(f"{repo} is gated: accept its terms on the Hub, then set HF_TOKEN to a token of "
                           f"that account", param="source", reason="gated")
    if isinstance(exc, errors.RepositoryNotFoundError):
        return SourceError(f"{repo} is neither a local path nor a Hugging Face Hub repo (check the id; a "
                           f"private repo needs HF_TOKEN)", param="source", reason="not_found")
    if isinstance(exc, (errors.LocalEntryNotFoundError, errors.OfflineModeIsEnabled)) or hub.constants.HF_HUB_OFFLINE:
        where = "HF_HUB_OFFLINE is set" if hub.constants.HF_HUB_OFFLINE else "the Hub could not be reached"
        return SourceError(
            f"{repo} (revision {rev}) is not in the local Hugging Face cache and {where}: unset "
            f"HF_HUB_OFFLINE or connect to download it once, check the id, or pass a local model folder "
            f"or .gguf file instead ({type(exc).__name__}: {exc})", param="source", reason="offline")
    if isinstance(exc, errors.EntryNotFoundError):
        return SourceError(f"{repo} (revision {rev}) lacks a file the export needs ({exc})",
                           param="source", reason="not_found")
    return SourceError(f"could not fetch {repo} (revision {rev}) from the Hugging Face Hub: "
                       f"{type(exc).__name__}: {exc}; check the connection and the id, or pass a local "
                       f"model folder", param="source", reason="network")
