"""Model families: one registered object per NVLM architecture, looked up from the checkpoint.

A `ModelFamily` bundles what nvlm-trt needs to know of one architecture: the HF architecture names
that select it, its config parser, the weight maps of its components, the TensorRT-LLM architecture,
config fields and layout table of its decoder, and its reference model (a class in runtime/reference.py,
named here as "module:Class" because the reference model sits in a layer above this one and is
resolved there by `runtime.reference.reference_model`). Everything else looks a family up with
`family_for(cfg)`; nothing outside this module names a family. NVLM-X and NVLM-H are registrations
beside NVLM-D (docs/ARCHITECTURE.md, "Add a model family").
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from . import trtllm_layout
from .config import NVLMConfig, parse_nvlm, top_level_architecture
from .errors import ConfigError, UnsupportedArchitectureError
from .trtllm_layout import Row
from .weight_map import INTERNVIT, MLP1, QWEN2, ComponentMap

# component roles (ComponentMap.name): inspect, sizing and the roofline ask for them by role
VISION, PROJECTOR, LLM = "vision", "projector", "llm"


@dataclass(frozen=True)
class ModelFamily:
    name: str
    architectures: tuple[str, ...]  # HF `architectures[0]` values that select this family
    parse: Callable[..., NVLMConfig]  # (raw, family=, architecture=) → typed config
    components: tuple[ComponentMap, ...]  # weight maps, in checkpoint order
    reference: str  # "module:Class" of the reference model
    trtllm_architecture: str  # TensorRT-LLM's name for the decoder (its MODEL_MAP key)
    trtllm_layout: tuple[Row, ...] | None  # None: no TensorRT-LLM converter for this family yet
    trtllm_config: dict = field(default_factory=dict)  # family-specific fields of the checkpoint config

    def component(self, role: str) -> ComponentMap:
        for c in self.components:
            if c.name == role:
                return c
        raise KeyError(f"family {self.name} has no {role!r} component")


FAMILIES: dict[str, ModelFamily] = {}


def register_family(family: ModelFamily) -> ModelFamily:
    taken = {a for f in FAMILIES.values() for a in f.architectures}
    if family.name in FAMILIES or taken & set(family.architectures):
        raise RuntimeError(f"family {family.name} (architectures {family.architectures}) registered twice")
    FAMILIES[family.name] = family
    return family


def supported_architectures() -> list[str]:
    return sorted(a for f in FAMILIES.values() for a in f.architectures)


def family_for_architecture(architecture: str) -> ModelFamily:
    for f in FAMILIES.values():
        if architecture in f.architectures:
            return f
    raise UnsupportedArchitectureError(f"config: architecture {architecture!r} is not supported; supported: "
                                       f"{', '.join(supported_architectures())}")


def family_for(cfg: NVLMConfig | str) -> ModelFamily:
    """The family of a typed config (or a family name)."""
    name = cfg if isinstance(cfg, str) else cfg.family
    if name not in FAMILIES:
        raise UnsupportedArchitectureError(f"model family {name!r} is not registered; known: {', '.join(FAMILIES)}")
    return FAMILIES[name]


# modelopt 0.47 writes QWenForCausalLM for the same Qwen2 decoder (TensorRT-LLM maps both to QWen)
TRTLLM_ALIASES = {"QWenForCausalLM": "Qwen2ForCausalLM"}


def family_for_trtllm(architecture: str | None) -> ModelFamily:
    """The family whose decoder a TensorRT-LLM checkpoint's `architecture` names."""
    name = TRTLLM_ALIASES.get(architecture, architecture)
    for f in FAMILIES.values():
        if f.trtllm_layout is not None and f.trtllm_architecture == name:
            return f
    known = sorted({f.trtllm_architecture for f in FAMILIES.values() if f.trtllm_layout is not None} | set(TRTLLM_ALIASES))
    raise UnsupportedArchitectureError(f"TensorRT-LLM architecture {architecture!r} is not one nvlm-trt writes "
                                       f"(known: {', '.join(known)})")


# --------------------------------------------------------------------------- entry points


def from_hf(raw: Mapping[str, Any]) -> NVLMConfig:
    """Translate an HF NVLM `config.json` (already parsed) into typed configs, through its family."""
    model_types = {a: a for a in supported_architectures()}  # the released config's model_type is "NVLM_D"
    arch = top_level_architecture(raw, model_types)
    family = family_for_architecture(arch)
    return family.parse(raw, family=family.name, architecture=arch)


def load_config(path: str | Path) -> NVLMConfig:
    """Read `config.json` from a checkpoint directory (or the file itself)."""
    path = Path(path)
    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        raise ConfigError(f"{file} not found: a checkpoint directory must contain the HF config.json")
    try:
        raw = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{file} is not valid JSON ({e}); re-download or fix the file") from None
    try:
        return from_hf(raw)
    except ConfigError as e:
        raise type(e)(f"{file}: {e}") from None


# --------------------------------------------------------------------------- the families

NVLM_D = register_family(ModelFamily(
    name="nvlm-d",
    architectures=("NVLM_D",),
    parse=parse_nvlm,
    components=(INTERNVIT, MLP1, QWEN2),
    reference="runtime.reference:NVLMReference",  # the base model: image embeddings replace <|vision_pad|>
    trtllm_architecture="Qwen2ForCausalLM",
    # QWenConfig.from_hugging_face would take llm_config.model_type, which the released NVLM-D config
    # sets to "llama" (rejected by TensorRT-LLM); the Qwen model reads qwen_type to size its MLP
    # ("qwen" halves intermediate_size), so it must say qwen2 explicitly.
    trtllm_config={"qwen_type": "qwen2"},
    trtllm_layout=trtllm_layout.QWEN2,
))
