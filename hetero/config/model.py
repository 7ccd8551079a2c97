"""The model section: a Llama-style decoder."""

from __future__ import annotations

from dataclasses import dataclass

from hetero.config.fields import Section, boolean, integer, name, number


@dataclass(frozen=True)
class ModelConfig:
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    ffn_hidden: int
    vocab: int
    seq_len: int
    tie_embeddings: bool = False
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    name: str = "model"

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


def read_model(section: Section) -> ModelConfig:
    heads = section.get("heads", integer(1, 1024))
    model = ModelConfig(
        name=section.get("name", name, "model"),
        layers=section.get("layers", integer(1, 1024)),
        hidden=section.get("hidden", integer(1, 1 << 17)),
        heads=heads,
        kv_heads=section.get("kv_heads", integer(1, 1024), heads),
        ffn_hidden=section.get("ffn_hidden", integer(1, 1 << 20)),
        vocab=section.get("vocab", integer(2, 1 << 22)),
        seq_len=section.get("seq_len", integer(1, 1 << 20)),
        tie_embeddings=section.get("tie_embeddings", boolean, False),
        norm_eps=section.get("norm_eps", number(0.0, 1.0), 1e-5),
        rope_theta=section.get("rope_theta", number(0.0, 1e9), 10000.0),
    )
    section.finish()
    if model.heads % model.kv_heads:
        section.fail("kv_heads", f"must divide heads ({model.heads}); got {model.kv_heads}")
    if model.hidden % model.heads:
        section.fail("hidden", f"must be a multiple of heads ({model.heads}); got {model.hidden}")
    if model.head_dim % 2:
        section.fail("hidden", f"hidden / heads = {model.head_dim} must be even for rotary embeddings")
    return model
