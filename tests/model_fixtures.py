"""Tiny random checkpoints saved by transformers in the real Hub layout (sharded
safetensors + index, config.json, generation_config.json, tokenizer files).

transformers is the test oracle only; moerun never imports it.
"""

from __future__ import annotations

from pathlib import Path

import torch

from tests.tokenizer_fixtures import TOKENIZER_VOCAB_SIZE, write_tokenizer

# Small but not degenerate: GQA (4 query heads over 2 kv heads), several experts,
# top-2 routing, and layer counts that exercise dense/sparse interleaving.
BASE = dict(
    vocab_size=TOKENIZER_VOCAB_SIZE,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    bos_token_id=None,
    eos_token_id=None,
    pad_token_id=None,
)

ARCH_CONFIGS = {
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": dict(
        num_experts=6,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=48,
        decoder_sparse_step=1,
        mlp_only_layers=[1],
        norm_topk_prob=False,
    ),
    "qwen3_moe": dict(
        num_experts=6,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        head_dim=24,
        decoder_sparse_step=1,
        mlp_only_layers=[0],
        norm_topk_prob=True,
    ),
}

TEMPLATE_FOR = {"mixtral": "mistral", "qwen2_moe": "chatml", "qwen3_moe": "chatml"}


def make_checkpoint(
    folder: Path,
    arch: str = "mixtral",
    dtype: torch.dtype = torch.bfloat16,
    shards: int = 2,
    seed: int = 0,
    template: str | None = None,
    **config_overrides,
) -> Path:
    """Save a tiny random `arch` (a transformers model_type) model to `folder`, return it.

    The config is BASE, then ARCH_CONFIGS[arch] when listed, then `config_overrides`, so a
    new family's test can pass its whole MoE config here. `shards` > 1 writes
    model-0000X-of-0000N.safetensors and the index; the tokenizer's special ids become
    the config's bos/eos ids, as in real checkpoints.
    """
    import transformers

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    template = template or TEMPLATE_FOR.get(arch, "chatml")
    write_tokenizer(folder, template=template)
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    eos = "</s>" if template == "mistral" else "<|im_end|>"
    ids = dict(bos_token_id=tok.token_to_id("<s>"), eos_token_id=tok.token_to_id(eos))

    config = transformers.AutoConfig.for_model(arch, **{**BASE, **ids, **ARCH_CONFIGS.get(arch, {}), **config_overrides})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).to(dtype)
    # Random init at std 0.02 makes every logit nearly equal; a larger scale gives the
    # routers and the sampler real decisions to get right.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.15)
    if shards > 1:
        total = sum(p.numel() * p.element_size() for p in model.parameters())
        model.save_pretrained(folder, max_shard_size=max(total // shards + 1, 1024))
    else:
        model.save_pretrained(folder, max_shard_size="10GB")
    return folder


def reference_model(folder: Path, dtype: torch.dtype = torch.float32):
    """The transformers model for `folder`, in `dtype`, eager attention, eval mode."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation="eager")
    return model.eval()
