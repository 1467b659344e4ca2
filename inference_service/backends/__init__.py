"""Model backends of the inference service (transformers; vLLM for causal LMs)."""
