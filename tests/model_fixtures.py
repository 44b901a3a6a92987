"""Tiny random checkpoints saved by transformers in the real Hub layout (sharded
safetensors + index, config.json, generation_config.json, tokenizer files).

transformers is the test oracle only; moerun never imports it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import moerun
from tests.tokenizer_fixtures import TOKENIZER_VOCAB_SIZE, write_tokenizer

# Small but not degenerate: GQA (4 query heads over 2 kv heads), several experts,
# top-2 routing, and layer counts that exercise dense/sparse interleaving. No special ids:
# make_checkpoint gives the config the tokenizer's.
TINY_ATTENTION = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
NO_SPECIAL_IDS = dict(bos_token_id=None, eos_token_id=None, pad_token_id=None)
BASE = dict(
    TINY_ATTENTION, vocab_size=TOKENIZER_VOCAB_SIZE, intermediate_size=96, num_hidden_layers=3, **NO_SPECIAL_IDS
)

# The Qwen MoE families' experts: six of them, top-2, every layer sparse but one.
QWEN_MOE = dict(num_experts=6, num_experts_per_tok=2, moe_intermediate_size=32, decoder_sparse_step=1)
ARCH_CONFIGS = {
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": dict(QWEN_MOE, shared_expert_intermediate_size=48, mlp_only_layers=[1], norm_topk_prob=False),
    "qwen3_moe": dict(QWEN_MOE, head_dim=24, mlp_only_layers=[0], norm_topk_prob=True),
}

# DeepSeek's latent attention (DeepSeek-V2/V3, GLM-4.7-Flash), tiny: as many kv heads as
# heads, as their configs have (MLA groups none).
TINY_MLA = dict(num_key_value_heads=4, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=24)
TINY_ROUTED_EXPERTS = dict(n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=32)

# Llama 3's RoPE scaling as released (Llama 4 keeps it); each test gives its original length.
LLAMA3_ROPE = dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0)

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

    template = template or TEMPLATE_FOR.get(arch, "chatml")
    folder, ids = tokenized_folder(folder, template)
    config = transformers.AutoConfig.for_model(
        arch, **{**BASE, **ids, **ARCH_CONFIGS.get(arch, {}), **config_overrides}
    )
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).to(dtype)
    randomize_matrices(model, 0.15)
    return save_checkpoint(model, folder, shards)


def tokenized_folder(folder: Path, template: str = "chatml") -> tuple[Path, dict]:
    """`folder` (made) with the test tokenizer in it, and the config's bos/eos ids: the
    tokenizer's special ids, as in real checkpoints."""
    from tokenizers import Tokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_tokenizer(folder, template=template)
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    eos = "</s>" if template == "mistral" else "<|im_end|>"
    return folder, dict(bos_token_id=tok.token_to_id("<s>"), eos_token_id=tok.token_to_id(eos))


def randomize_matrices(model: torch.nn.Module, std: float) -> None:
    """Every matrix drawn at `std` (from torch's global generator, which the caller seeds).
    Random init at std 0.02 makes every logit nearly equal; a larger scale gives the
    routers and the sampler real decisions to get right."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, std)


def save_checkpoint(model, folder: Path, shards: int, **save_options) -> Path:
    """save_pretrained into `shards` shards (model-0000X-of-0000N.safetensors and the
    index) or, with one, a single model.safetensors -> folder."""
    if shards > 1:
        total = sum(p.numel() * p.element_size() for p in model.parameters())
        model.save_pretrained(folder, max_shard_size=max(total // shards + 1, 1024), **save_options)
    else:
        model.save_pretrained(folder, max_shard_size="10GB", **save_options)
    return folder


def checkpoint_headers(folder: Path) -> dict:
    """The checkpoint's tensors as its headers say: name -> (shape, dtype)."""
    from moerun.weights import CheckpointWeights

    with CheckpointWeights.open(folder) as ckpt:
        return ckpt.headers()


def set_tensors(folder: Path, values: dict[str, torch.Tensor]) -> None:
    """Overwrite checkpoint tensors in place, stored in the dtype given, in whichever shard
    holds them."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
    else:
        weight_map = dict.fromkeys(values, "model.safetensors")
    for shard in {weight_map[name] for name in values}:
        tensors = load_file(folder / shard)
        tensors.update({k: v for k, v in values.items() if weight_map[k] == shard})
        save_file(tensors, folder / shard, metadata={"format": "pt"})


def reference_model(folder: Path, dtype: torch.dtype = torch.float32):
    """The transformers model for `folder`, in `dtype`, eager attention, eval mode."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation="eager")
    return model.eval()


def load_pair(folder: Path) -> tuple:
    """(moerun's model of `folder` in float32 on the CPU, the transformers reference)."""
    return moerun.load(str(folder), device="cpu", dtype=torch.float32), reference_model(folder)


def family_fixtures(makers: dict, **options) -> tuple:
    """A family test module's two module-scoped fixtures, one param per maker
    (name -> make(folder, **options) -> folder): `checkpoint` -> (name, folder) and
    `pair` -> (name, folder, ours, reference), as load_pair makes them. The module
    binds them: `checkpoint, pair = family_fixtures(MAKERS)`."""

    @pytest.fixture(scope="module", params=list(makers), name="checkpoint")
    def checkpoint(request, tmp_path_factory):
        return request.param, makers[request.param](tmp_path_factory.mktemp(request.param), **options)

    @pytest.fixture(scope="module", name="pair")
    def pair(checkpoint):
        name, folder = checkpoint
        return name, folder, *load_pair(folder)

    return checkpoint, pair
