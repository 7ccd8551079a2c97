"""Sharded, asynchronous, layout-free checkpoints.

Layout of `<dir>/step-NNNNNNNN/`:
  rank-RRRRR.safetensors   what rank R owns: chunks (boxes) of full tensors under Hugging Face
                           names (weights; AdamW moments as exp_avg.<name>, exp_avg_sq.<name>)
  state.json               step, model, every file's size and sha256, and every tensor's global
                           shape, dtype and chunks (offsets, lengths, file, key): any plan loads it
`<dir>/latest` names the newest sealed checkpoint.

One job per module: format (chunks and their geometry), writer (a rank's file, streamed by a
background thread, hashed as written), seal (reports merged into state.json, rename, `latest`),
reader (finding, verifying, reading the boxes a rank needs), staging (the host buffers a save copies
into, reused save after save).
"""
