"""KV-cache policies: what each attention site keeps and attends (one module per policy)."""
