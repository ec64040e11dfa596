"""The index of the repository's Python models (reference target; the entry model serves every target).

Each `REPO/<model>/1/model.py` is one line that imports a class from here, so the serving logic is in the
package (one implementation, importable by tests) and the repository stays regenerable. One model per module:

    nvlm (models/entry.py: BLS, decoupled) ─▶ preprocessing (models/preprocessing.py)
        ─▶ vision_encoder (models/vision_encoder.py, only with images) ─▶ tensorrt_llm (models/llm_step.py)
        ◀── text deltas (stream) or one answer ◀── postprocessing (models/postprocessing.py)

What needs no Triton stub — admission, coalescing, the answer's stop words, text and log-probs — is in
serving_core.py; the stub's own helpers are in pb.py. Bad requests are answered with an error response and
the model instance keeps serving; nothing raised by a request escapes `execute`.
"""

from __future__ import annotations

from .models.entry import EntryModel
from .models.llm_step import NullLLMModel, ReferenceLLMModel, StandInLLMModel
from .models.postprocessing import PostprocessingModel
from .models.preprocessing import PreprocessingModel
from .models.vision_encoder import StandInVisionModel, VisionEncoderModel

MODEL_CLASSES = {"preprocessing": "PreprocessingModel", "vision_encoder": "VisionEncoderModel",
                 "tensorrt_llm": "ReferenceLLMModel", "postprocessing": "PostprocessingModel", "nvlm": "EntryModel"}
# contract target: stand-ins for the two GPU backends (every other model runs unchanged)
STANDIN_CLASSES = {"vision_encoder": "StandInVisionModel", "tensorrt_llm": "StandInLLMModel"}
# benchmark only (--null-engine): the contract target with an LLM step that runs no model
NULL_ENGINE_CLASSES = {**STANDIN_CLASSES, "tensorrt_llm": "NullLLMModel"}

__all__ = ["NullLLMModel", "NULL_ENGINE_CLASSES", "EntryModel", "PostprocessingModel", "PreprocessingModel", "ReferenceLLMModel", "StandInLLMModel",
           "StandInVisionModel", "VisionEncoderModel", "MODEL_CLASSES", "STANDIN_CLASSES"]
