"""geobench: a benchmark harness for optimizer geometry."""

from geobench.hookspecs import hookimpl
from geobench.params import Param

__version__ = "0.1.0"
__all__ = ["Param", "__version__", "hookimpl"]
