"""hetero compare in one process: the whole model as one hetero stage (hetero.model +
the Hugging Face loader) against transformers' LlamaForCausalLM, both on this host's
CPU, on one batch of the synthetic sample stream (the batch a run with this seed
trains on at step 1 when its global batch is `batch`)."""

from __future__ import annotations

import torch

from hetero.compare.diff import DEFAULT_RTOL, compare_traces
from hetero.compare.trace import Trace, record
from hetero.config.train import DataConfig
from hetero.engine.data import SampleSource
from hetero.engine.precision import DTYPES
from hetero.errors import UserError
from hetero.model.hf import load_hf_stage, read_hf_config


def first_batch(config, batch: int, seq_len: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Step 1's inputs and labels (batch, seq_len) of the synthetic stream."""
    source = SampleSource(DataConfig("synthetic"), config.vocab, seq_len, seed, batch)
    return source.batch(0, 0, batch)


def hetero_trace(stage, tokens: torch.Tensor, labels: torch.Tensor) -> Trace:
    return record(stage, stage, stage.loss, tokens, labels)


def transformers_trace(hf_dir: str, dtype: str, tokens: torch.Tensor, labels: torch.Tensor) -> Trace:
    transformers = _transformers()
    model = transformers.LlamaForCausalLM.from_pretrained(hf_dir).to(DTYPES[dtype]).eval()

    def loss_of(logits, targets):
        return torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), targets.flatten())

    return record(model, lambda inputs: model(input_ids=inputs).logits, loss_of, tokens, labels)


def compare_local(hf_dir: str, *, dtype: str = "fp32", batch: int = 2, seq_len: int | None = None,
                  seed: int = 0, rtol: float | None = None) -> dict:
    """Everything `hetero compare --json` prints, for the one-process comparison."""
    config = read_hf_config(hf_dir)
    seq_len = min(config.seq_len, seq_len or 64)
    tokens, labels = first_batch(config, batch, seq_len, seed)
    theirs = transformers_trace(hf_dir, dtype, tokens, labels)
    ours = hetero_trace(load_hf_stage(hf_dir, dtype=DTYPES[dtype]), tokens, labels)
    rtol = DEFAULT_RTOL[dtype] if rtol is None else rtol
    return {"model": hf_dir, "where": "one process (cpu)", "dtype": dtype, "batch": batch, "seq_len": seq_len,
            "seed": seed, "layers": config.layers, "rtol_default": rtol == DEFAULT_RTOL[dtype],
            **compare_traces(ours, theirs, rtol)}


def _transformers():
    try:
        import transformers
    except ImportError:
        raise UserError("hetero compare runs transformers as the reference and it is not installed: "
                        "pip install transformers") from None
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()    # "Loading weights" bars on stderr
    return transformers
