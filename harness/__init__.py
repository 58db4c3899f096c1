"""geobench: a benchmark harness for optimizer geometry. The plugin API is `geobench.api`."""

from geobench.api import Param, hookimpl

__version__ = "0.1.0"
__all__ = ["Param", "__version__", "hookimpl"]
