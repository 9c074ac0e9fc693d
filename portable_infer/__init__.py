"""portable_infer: run LLM model packages through ONNX Runtime on whatever hardware is present."""

from portable_infer.errors import (  # noqa: F401
    BundleError, ChecksumError, ContextLengthError, DependencyError, ExportError, GenerationError,
    InvalidArgumentError, PackageError, PortableInferError, ProviderError, SchemaVersionError, SignatureError,
    SourceError, UnsupportedArchitectureError, VerificationError,
)

from portable_infer._version import __version__  # noqa: F401

from portable_infer.decode.constraints import Constraint  # noqa: E402,F401
from portable_infer.loader import load  # noqa: E402,F401
from portable_infer.model import Model  # noqa: E402,F401
from portable_infer.decode.sampling import SamplingParams  # noqa: E402,F401
from portable_infer.text.streaming import Response  # noqa: E402,F401
