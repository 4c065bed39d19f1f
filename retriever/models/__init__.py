"""An MLLM as an embedding model: families, poolers, adapters, loading."""
