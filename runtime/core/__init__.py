"""The ground layer: the model description (typed config, errors, families, formats), checkpoint I/O,
weight maps, the TensorRT-LLM layout and checkpoint writer, the build-directory contract and sizing.

It imports nothing else from the project; everything else may import it (docs/ARCHITECTURE.md)."""

__version__ = "0.1.0"
