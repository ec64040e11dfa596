"""Validation of a request's sampling inputs: one rule set that the entry model and the LLM step both
call, so that a bad value is refused with its name before it reaches the executor (NaN temperature
with top_k failed late inside torch; a negative top_k or a top_p above 1 was accepted)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from runtime.core.errors import InputError


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0  # 0: greedy
    top_k: int = 1  # 0: no top-k cut
    top_p: float = 0.0  # 0: no nucleus cut
    min_tokens: int = 0
    beam_width: int = 1
    penalties: tuple[tuple[str, float], ...] = ()  # (name, value) of the penalty inputs that were sent

    def check(self, max_tokens: int) -> "Sampling":
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise InputError(f"temperature must be a finite number ≥ 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            raise InputError(f"top_k must be ≥ 0 (0 = no top-k cut), got {self.top_k}")
        if not math.isfinite(self.top_p) or not 0 <= self.top_p <= 1:
            raise InputError(f"top_p must be in [0, 1] (0 = no nucleus cut), got {self.top_p}")
        if not 0 <= self.min_tokens <= max_tokens:
            raise InputError(f"min_tokens must be in 0…max_tokens ({max_tokens}), got {self.min_tokens}")
        if self.beam_width != 1:
            raise InputError(f"beam_width must be 1 (engines are built with max_beam_width 1), got {self.beam_width}")
        for name, value in self.penalties:
            if not math.isfinite(value):
                raise InputError(f"{name} must be a finite number, got {value}")
            if name == "repetition_penalty" and value <= 0:  # it divides and multiplies logits (1 = off)
                raise InputError(f"repetition_penalty must be a finite number > 0 (1 = off), got {value}")
        return self
