"""What every architecture file builds on: config parsing, the decoder stack and the
causal-LM head, and the helper that stacks per-expert checkpoint tensors.

Shape legend: B batch, T tokens, D hidden, V vocab, E experts.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from moerun.errors import MoerunError
from moerun.layers import KVCache, RMSNorm, Start


@dataclasses.dataclass
class BaseModelArgs:
    """Fields are named exactly as in config.json; unknown keys are ignored."""

    @classmethod
    def from_dict(cls, config: dict):
        names = {f.name for f in dataclasses.fields(cls)}
        missing = [
            f.name
            for f in dataclasses.fields(cls)
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING and f.name not in config
        ]
        if missing:
            raise MoerunError(f"config.json lacks {', '.join(missing)} (needed by {config.get('model_type')})")
        return cls(**{k: v for k, v in config.items() if k in names})


class DecoderLayer(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then h + ffn(norm(h)). The feed-forward
    keeps its checkpoint attribute name (`block_sparse_moe` for Mixtral, `mlp` for Qwen)."""

    def __init__(self, attn: nn.Module, ffn: nn.Module, ffn_name: str, hidden_size: int, eps: float):
        super().__init__()
        self.input_layernorm = RMSNorm(hidden_size, eps)
        self.self_attn = attn
        self.post_attention_layernorm = RMSNorm(hidden_size, eps)
        self.ffn_name = ffn_name
        setattr(self, ffn_name, ffn)

    def forward(self, x: torch.Tensor, cache: KVCache, start: Start) -> torch.Tensor:
        h = x + self.self_attn(self.input_layernorm(x), cache, start)
        return h + getattr(self, self.ffn_name)(self.post_attention_layernorm(h))


class Backbone(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int, layers: list[nn.Module], eps: float):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab_size, hidden_size)
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(hidden_size, eps)


class CausalLM(nn.Module):
    """Decoder-only LM with checkpoint-compatible names (`model.layers.N...`, `lm_head`)."""

    def __init__(self, args, layers: list[DecoderLayer], kv_heads: int, head_dim: int):
        super().__init__()
        self.args = args
        self.model = Backbone(args.vocab_size, args.hidden_size, layers, args.rms_norm_eps)
        self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        self.kv_heads, self.head_dim = kv_heads, head_dim

    def make_caches(self, batch: int, max_len: int) -> list[KVCache]:
        ref = self.model.embed_tokens.weight
        return [
            KVCache(batch, self.kv_heads, max_len, self.head_dim, ref.dtype, ref.device)
            for _ in self.model.layers
        ]

    def forward(
        self, input_ids: torch.Tensor, caches: list[KVCache], start: Start = 0, last_only: bool = False
    ) -> torch.Tensor:
        """input_ids [B, T] at positions [start, start+T) -> logits [B, T, V] (or [B, 1, V]
        with last_only, which spares the vocab projection of every prompt token). `start`
        may be a StaticPosition: a one-token step with fixed shapes, for CUDA graphs."""
        x = self.model.embed_tokens(input_ids)
        for layer, cache in zip(self.model.layers, caches):
            x = layer(x, cache, start)
        if last_only:
            x = x[:, -1:]
        return self.lm_head(self.model.norm(x))


def moe_layer_indices(n_layers: int, n_experts: int, decoder_sparse_step: int, mlp_only_layers) -> set[int]:
    """Which layers are sparse in the Qwen families: not listed as MLP-only, and every
    `decoder_sparse_step`-th layer (1-based), as the reference decides."""
    step = max(int(decoder_sparse_step or 1), 1)
    only_dense = set(mlp_only_layers or [])
    return {
        i for i in range(n_layers) if i not in only_dense and n_experts > 0 and (i + 1) % step == 0
    }


def stack_experts(
    weights: dict[str, torch.Tensor], prefix: str, n_experts: int, gate: str, up: str, down: str
) -> None:
    """Replace `{prefix}.{e}.{gate|up|down}.weight` for every expert e by the stacked
    `{prefix}.w13` [E, 2I, D] and `{prefix}.w2` [E, D, I], in place. A no-op when the
    layer is already stacked, so converted checkpoints pass through unchanged."""
    if f"{prefix}.w13" in weights or f"{prefix}.0.{gate}.weight" not in weights:
        return

    def take(e: int, name: str) -> torch.Tensor:
        key = f"{prefix}.{e}.{name}.weight"
        if key not in weights:
            raise MoerunError(f"tensor {key} is missing from the checkpoint")
        return weights.pop(key)

    w13, w2 = [], []
    for e in range(n_experts):
        g, u, d = take(e, gate), take(e, up), take(e, down)
        if g.shape != u.shape:
            raise MoerunError(
                f"tensor {prefix}.{e}.{up}.weight has shape {list(u.shape)}, expected {list(g.shape)}"
            )
        pair = torch.cat([g, u], dim=0)
        if w13 and pair.shape != w13[0].shape:
            raise MoerunError(
                f"tensor {prefix}.{e}.{gate}.weight has shape {list(g.shape)}, expected {[w13[0].shape[0] // 2, w13[0].shape[1]]}"
            )
        if w2 and d.shape != w2[0].shape:
            raise MoerunError(f"tensor {prefix}.{e}.{down}.weight has shape {list(d.shape)}, expected {list(w2[0].shape)}")
        w13.append(pair)
        w2.append(d)
    weights[f"{prefix}.w13"] = torch.stack(w13)
    weights[f"{prefix}.w2"] = torch.stack(w2)
