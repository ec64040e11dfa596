"""nvlm-trt builder: the compiler — build stages, the build driver and the `nvlm-build` CLI."""

from runtime.core import __version__

__all__ = ["__version__"]
