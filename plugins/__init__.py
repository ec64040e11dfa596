"""nvlm-trt plugins: OpenAI Triton kernels and their TensorRT registrations."""
