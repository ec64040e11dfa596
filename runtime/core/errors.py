"""Typed errors. Every error says what is wrong and what the user can do about it.

The CLI turns any `NVLMError` into a one-paragraph message and exit code 2; anything
else is a bug and keeps its traceback.
"""


class NVLMError(Exception):
    """Base class of every error nvlm-trt raises on purpose."""


class ConfigError(NVLMError):
    """The checkpoint's config.json is missing, malformed or internally inconsistent."""


class UnsupportedArchitectureError(ConfigError):
    """The config names an architecture that has no registered converter."""


class CheckpointError(NVLMError):
    """The weight files are missing, unsafe, corrupt or disagree with the index."""


class PickleCheckpointError(CheckpointError):
    """Pickle checkpoints (.bin/.pt) are refused: loading them can execute code."""


class ShapeMismatchError(CheckpointError):
    """A tensor's shape or dtype disagrees with what the config implies."""


class WeightMapError(CheckpointError):
    """Source tensors were left unconsumed or target tensors were not produced."""


class OutputExistsError(NVLMError):
    """The output directory exists and --force was not given."""


class InputError(NVLMError):
    """A request's prompt or images cannot be processed (serving maps this to INVALID_ARGUMENT)."""


class TokenizerError(NVLMError):
    """The checkpoint's tokenizer files are missing or lack a token NVLM needs."""


class EnvironmentMismatchError(NVLMError):
    """An installed library behaves differently from what NVLM's reference requires."""


class EngineToolError(NVLMError):
    """TensorRT / TensorRT-LLM is missing or cannot build engines, or a build's limits cannot hold."""
