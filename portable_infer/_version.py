"""The one version of portable_infer (read by pyproject.toml, the package and the exporter)."""

__version__ = "0.3.0"
