"""The client side of a deployment: `nvlm-client` (triton_client), the OpenAI client, and `nvlm-bench` with its
load generator, workloads, report and roofline. It talks to a server over gRPC or HTTP and imports neither
the server (triton_repo) nor the compiler (builder)."""
