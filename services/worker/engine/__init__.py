"""The worker engine: one base model, continuous batching, paged KV cache, multi-LoRA rows."""
