"""trace_core: the TRACE realignment method as a plain library (no Prefect, no MLflow)."""

from trace_realign.core.errors import ConfigError, DataError, TraceError

__all__ = ["TraceError", "DataError", "ConfigError"]
__version__ = "0.1.0"
