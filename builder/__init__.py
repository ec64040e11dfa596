"""nvlm-trt builder: NVLM checkpoint model, checkpoint I/O, weight maps and the `nvlm-build` CLI."""

__version__ = "0.1.0"
