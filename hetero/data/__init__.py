"""Training data made from text: `hetero data prepare` encodes plain-text and JSONL
documents with a Hugging Face tokenizer into a flat token file plus a JSON sidecar,
which `data: {kind: tokens, path: ...}` reads (hetero.engine.data)."""
