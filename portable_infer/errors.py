"""One exception hierarchy for the whole project.

Every error a user can cause derives from :class:`PortableInferError`, names the problem and says
what to do about it. Callers catch the base class; tests assert on the subclasses.
"""

from __future__ import annotations


class PortableInferError(Exception):
    """Base class of every error raised on purpose by portable_infer and its exporter."""


# --- model packages ------------------------------------------------------------------------------
class PackageError(PortableInferError):
    """A model package is missing, incomplete or unreadable."""


class ChecksumError(PackageError):
    """A file of a model package does not match the sha256 or size in its manifest."""


class SchemaVersionError(PackageError):
    """The manifest was written by an exporter this runtime does not understand."""


class ManifestError(PackageError):
    """A manifest field has the wrong type or value; ``field`` names it (e.g. ``variants[0].file``)."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


class UnsafePathError(ManifestError):
    """A path named by a package leaves it: absolute, ``..``, a drive letter, a symlink out, unlisted."""

    def __init__(self, message: str, field: str | None = None, path: str | None = None):
        super().__init__(message, field)
        self.path = path


class BundleError(PackageError):
    """A ``.pinf`` bundle is corrupted, truncated, incomplete or holds an unsafe member name."""


class SignatureError(BundleError):
    """A bundle's Ed25519 signature is missing, malformed or does not match the trusted key."""


# --- user input ----------------------------------------------------------------------------------
class InvalidArgumentError(PortableInferError, ValueError):
    """A parameter is outside its allowed range (sampling values, limits, ...).

    ``param`` names the offending argument (``"temperature"``, ``"prompt"``...) where one does,
    so callers (the server's 400s) need not parse the message.
    """

    def __init__(self, message: str = "", *, param: str | None = None):
        super().__init__(message)
        self.param = param


class ContextLengthError(InvalidArgumentError):
    """A prompt (plus the tokens asked for) does not fit the model's context.

    ``param`` is what to lower: ``"prompt"`` (the default: the prompt alone leaves nothing to
    generate) or ``"max_new_tokens"`` (the prompt fits, the tokens asked for do not)."""

    def __init__(self, message: str = "", *, param: str | None = "prompt"):
        super().__init__(message, param=param)


class GenerationError(PortableInferError):
    """One request's generation failed while it ran (NaN or infinite logits from the model, a
    tokenizer error...). The scheduler ends that request with it; the others in its step go on.
    ``reason`` names the cause (``"nan_logits"``, ``"inf_logits"``, ``"no_candidates"``,
    ``"detokenize"``...)."""

    def __init__(self, message: str, reason: str = "error"):
        super().__init__(message)
        self.reason = reason


# --- execution providers -------------------------------------------------------------------------
class ProviderError(PortableInferError):
    """An execution provider is unknown, unavailable, or failed to start.

    ``provider`` is the table key of the provider at fault (``"openvino"``) where one is, and
    ``reason`` what happened (``"no suitable variant"``, ``"not available"``, ``"failed"``).
    """

    def __init__(self, message: str = "", *, provider: str | None = None, reason: str | None = None):
        super().__init__(message)
        self.provider, self.reason = provider, reason


# --- serving -------------------------------------------------------------------------------------
class CapacityError(PortableInferError):
    """The scheduler is full (every slot and its waiting queue): try again after ``retry_after`` s."""

    def __init__(self, message: str, retry_after: float = 1.0):
        super().__init__(message)
        self.retry_after = retry_after


# --- optional dependencies -----------------------------------------------------------------------
class DependencyError(PortableInferError, ImportError):
    """An optional dependency is missing or has the wrong version."""


# --- export --------------------------------------------------------------------------------------
class ExportError(PortableInferError):
    """The exporter could not turn a source model into a package."""


class SourceError(ExportError):
    """The source model is missing, truncated or inconsistent (config, tensors, shapes).

    ``param`` names the setting at fault where one does (``"desc_act"``, ``"revision"``...) and
    ``reason`` what is wrong (``"unsupported"``, ``"offline"``, ``"not_found"``...)."""

    def __init__(self, message: str = "", *, param: str | None = None, reason: str | None = None):
        super().__init__(message)
        self.param, self.reason = param, reason


class UnsupportedArchitectureError(ExportError):
    """No registered architecture family handles this model_type."""


class VerificationError(ExportError):
    """The exported graph does not match its reference within tolerance."""


def require(module: str, extra: str = "export"):
    """Import an optional dependency, or raise :class:`DependencyError` with the install hint."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        if exc.name is not None and exc.name.split(".")[0] != module.split(".")[0]:
            raise  # a real ImportError inside an installed package: don't hide it
        raise DependencyError(
            f"{module} is needed for this and is not installed; "
            f'install it with: pip install "portable-infer[{extra}]"'
        ) from exc
