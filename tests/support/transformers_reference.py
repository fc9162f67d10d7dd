"""Test-only: transformers' configs for our T5 and CLIP configs, so parity tests and the pipeline
benchmark build the reference models the same way."""

from __future__ import annotations

from comfyui_flux_schnell.flux.clip import CLIPTextConfig
from comfyui_flux_schnell.flux.t5 import T5Config


def hf_t5_config(config: T5Config):
    """transformers.T5Config of a T5 v1.1 encoder (gated GELU, no dropout)."""
    import transformers

    return transformers.T5Config(
        vocab_size=config.vocab_size,
        d_model=config.d_model,
        d_kv=config.d_kv,
        d_ff=config.d_ff,
        num_layers=config.num_layers,
        num_heads=config.num_heads,
        relative_attention_num_buckets=config.relative_attention_num_buckets,
        relative_attention_max_distance=config.relative_attention_max_distance,
        layer_norm_epsilon=config.layer_norm_epsilon,
        feed_forward_proj="gated-gelu",
        dropout_rate=0.0,
        is_encoder_decoder=False,
        use_cache=False,
    )


def hf_clip_config(config: CLIPTextConfig):
    """transformers.CLIPTextConfig of the CLIP-L text model as FLUX calls it."""
    import transformers

    return transformers.CLIPTextConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        max_position_embeddings=config.max_position_embeddings,
        layer_norm_eps=config.layer_norm_eps,
        hidden_act="quick_gelu",
        bos_token_id=config.vocab_size - 2,
        pad_token_id=config.vocab_size - 1,
        eos_token_id=2,  # openai/clip-vit-large-patch14's legacy value: pooled at ids.argmax(-1)
    )
