"""portable_infer: run LLM model packages through ONNX Runtime on whatever hardware is present."""

from .errors import (  # noqa: F401
    BundleError, ChecksumError, ContextLengthError, DependencyError, ExportError, GenerationError,
    InvalidArgumentError, PackageError, PortableInferError, ProviderError, SchemaVersionError, SignatureError,
    SourceError, UnsupportedArchitectureError, VerificationError,
)

from ._version import __version__  # noqa: F401

from .constraints import Constraint  # noqa: E402,F401
from .loader import load  # noqa: E402,F401
from .model import Model  # noqa: E402,F401
from .sampling import SamplingParams  # noqa: E402,F401
from .streaming import Response  # noqa: E402,F401
