"""`hetero export CHECKPOINT --hf OUT_DIR`: a hetero checkpoint as a Hugging Face Llama directory.

One job per module: source (which checkpoint a path names, opened through hetero.checkpoint.reader),
hf_config (config.json and generation_config.json from the model description), shards (which tensors go
in which output file, sizes like 5GB), tokenizer (the run's tokenizer files, found through its data
sidecar), export (streaming the tensors out shard by shard, the index, the move into place).
"""
