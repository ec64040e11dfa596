"""nvlm-trt Triton Inference Server model-repository generator."""
