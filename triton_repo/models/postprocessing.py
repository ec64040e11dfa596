"""`postprocessing`: output_ids → text_output (a non-streamed answer's text)."""

from __future__ import annotations

import numpy as np

from runtime.core.build_dir import read_chat_format
from runtime.tokenizer import NVLMTokenizer

from ..pb import Inputs, build_dir, error, get_input, stub


class PostprocessingModel:
    def initialize(self, args):
        self.tok = NVLMTokenizer.from_dir(build_dir(args) / "tokenizer", chat_format=read_chat_format(build_dir(args)))

    def execute(self, requests):
        pb = stub()
        out = []
        for request in requests:
            try:
                ids = get_input(Inputs(request), "output_ids").reshape(-1).tolist()
                text = self.tok.decode(ids)
                out.append(pb.InferenceResponse(output_tensors=[pb.Tensor("text_output", np.asarray([text.encode()], object))]))
            except Exception as e:  # noqa: BLE001
                out.append(error(f"postprocessing: {e}"))
        return out
