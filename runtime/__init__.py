"""nvlm-trt runtime: the reference NVLM-D model, tokenizer and prompt construction."""
