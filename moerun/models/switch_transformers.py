"""Switch Transformer (google/switch-base-8 ... switch-large-128): a T5 encoder-decoder whose
every other feed-forward is a top-1 sparse MLP. T5's parts: RMS layer norm without mean or
bias, attention without the 1/sqrt(d) scale, a learned relative position bias (buckets,
bidirectional in the encoder, causal in the decoder) computed by each stack's first layer
and shared by the others, cross-attention over the encoder output, a tied lm_head scaled by
d_model**-0.5. The router softmaxes in float32, takes the top-1 expert and scales its output
by that probability; at inference transformers still drops a sequence's tokens past an
expert's `expert_capacity` (cumulative count per sequence and call), so we do too. Experts
are gate-less ReLU FFNs (`wi`, `wo`): RoutedExperts with the non-gated RELU activation.

Generation: `encode(prompt)` runs the encoder once and writes every decoder layer's
cross-attention keys and values into its state; the decoder then runs like a decoder-only
model from `decoder_start_token_id` against its static self-attention KV cache.

Shape legend: B batch, S encoder tokens, T new decoder tokens, D d_model, H heads, Dh d_kv,
E experts, I d_ff, V vocab.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from moerun.errors import MoerunError
from moerun.layers import (
    KVCache,
    RMSNorm,
    Start,
    StateSpec,
    StaticPosition,
    context_full,
    key_positions,
    token_positions,
)
from moerun.models.base import BaseModelArgs, CheckpointLayout, SparseMoeBlock
from moerun.moe.experts import RELU, RoutedExperts


@dataclasses.dataclass(kw_only=True)
class ModelArgs(BaseModelArgs):
    model_type: str
    vocab_size: int
    d_model: int
    d_ff: int
    d_kv: int
    num_layers: int
    num_heads: int
    num_experts: int
    num_decoder_layers: int | None = None
    num_sparse_encoder_layers: int = 3
    num_sparse_decoder_layers: int = 3
    encoder_sparse_step: int | None = None  # as saved by transformers; else from num_sparse_*
    decoder_sparse_step: int | None = None
    expert_capacity: int = 64
    router_bias: bool = False
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    dense_act_fn: str = "relu"
    feed_forward_proj: str | None = None  # older T5-style configs name the activation here
    tie_word_embeddings: bool = True
    pad_token_id: int | None = 0
    decoder_start_token_id: int | None = None
    torch_dtype: str | None = None  # the stored dtype (the released switch checkpoints: float32)
    dtype: str | None = None
    # Relative positions have no learned limit; this caps the planned context (encoder
    # prompt and decoder tokens alike).
    max_position_embeddings: int = 4096

    def __post_init__(self):
        if self.num_decoder_layers is None:
            self.num_decoder_layers = self.num_layers
        # transformers derives the steps from num_sparse_*_layers, and a saved step overrides it.
        if self.encoder_sparse_step is None:
            n = self.num_sparse_encoder_layers
            self.encoder_sparse_step = self.num_layers // n if n > 0 else self.num_layers
        if self.decoder_sparse_step is None:
            n = self.num_sparse_decoder_layers
            self.decoder_sparse_step = self.num_decoder_layers // n if n > 0 else self.num_decoder_layers
        if self.decoder_start_token_id is None:
            self.decoder_start_token_id = self.pad_token_id or 0

    # The names the planner and CheckpointLayout read.
    @property
    def hidden_size(self) -> int:
        return self.d_model

    @property
    def num_hidden_layers(self) -> int:
        return self.num_layers + self.num_decoder_layers

    def is_sparse(self, i: int, decoder: bool) -> bool:
        """transformers' rule: block i is sparse when i % step == 1 (every block for step 1)."""
        step = self.decoder_sparse_step if decoder else self.encoder_sparse_step
        return (i % step == 1 or step == 1) if step > 0 else False


def check_loadable(args: ModelArgs) -> None:
    act = (args.feed_forward_proj or args.dense_act_fn or "relu").removeprefix("dense-")
    if act != "relu":
        raise MoerunError(f"switch_transformers: activation {act!r} is not supported (relu is)")


def first_layers(config: dict, layers: int) -> str:
    """Keep the first `layers` blocks of the encoder and of the decoder (a synthetic bench of
    a slice), in `config` in place; the note says so."""
    n_enc, n_dec = config["num_layers"], config.get("num_decoder_layers") or config["num_layers"]
    config["num_layers"], config["num_decoder_layers"] = min(layers, n_enc), min(layers, n_dec)
    return (
        f"first {config['num_layers']} of {n_enc} encoder and {config['num_decoder_layers']} of {n_dec} decoder layers"
    )


def layer_paths(args: ModelArgs) -> list[str]:
    """The module path of every block, encoder first: the model's layer order for the
    expert cache and the planner (layer i is the i-th entry)."""
    return [f"encoder.block.{i}" for i in range(args.num_layers)] + [
        f"decoder.block.{i}" for i in range(args.num_decoder_layers)
    ]


def layer_of(name: str, args: ModelArgs) -> int | None:
    """The layer (index into layer_paths) a checkpoint tensor belongs to, None for the rest:
    the loader reads one layer's tensors at a time."""
    stack, _, rest = name.partition(".block.")
    if stack not in ("encoder", "decoder") or not rest.split(".", 1)[0].isdigit():
        return None
    return int(rest.split(".", 1)[0]) + (args.num_layers if stack == "decoder" else 0)


def relative_position_bucket(relative: torch.Tensor, bidirectional: bool, num_buckets: int, max_distance: int):
    """T5's bucketing of key - query distances (as Mesh TensorFlow and transformers do it)."""
    buckets = torch.zeros_like(relative)
    if bidirectional:
        num_buckets //= 2
        buckets += (relative > 0).long() * num_buckets
        relative = relative.abs()
    else:
        relative = -torch.clamp(relative, max=0)
    max_exact = num_buckets // 2
    is_small = relative < max_exact
    large = (
        max_exact
        + (
            torch.log(relative.float() / max_exact) / math.log(max_distance / max_exact) * (num_buckets - max_exact)
        ).long()
    )
    large = torch.clamp(large, max=num_buckets - 1)
    return buckets + torch.where(is_small, relative, large)


class DecoderState(KVCache):
    """A decoder layer's state: its self-attention KV cache [B, H, L, Dh], and the keys and
    values of the encoder output for cross-attention (up to L encoder positions), written
    once per prompt by Model.encode. `source_len` (host) slices them for eager steps;
    `source_bias` [L] (device; 0 where written, -inf past the prompt) masks them for a
    static step, so that one captured CUDA graph serves every prompt length."""

    def __init__(self, batch: int, n_heads: int, max_len: int, head_dim: int, dtype, device):
        super().__init__(batch, n_heads, max_len, head_dim, dtype, device)
        self.cross_k = torch.zeros_like(self.k)
        self.cross_v = torch.zeros_like(self.v)
        self.source_bias = torch.zeros(max_len, dtype=dtype, device=device)
        self.source_len = 0

    def set_source(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """The encoder output's keys and values [B, H, S, Dh]."""
        S = k.shape[2]
        if S > self.max_len:
            raise context_full(S, self.max_len)
        self.cross_k[:, :, :S], self.cross_v[:, :, :S] = k, v
        self.source_bias.fill_(float("-inf"))[:S] = 0.0
        self.source_len = S

    def source(self, start: Start) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(keys, values, additive bias [1, 1, 1, L] or None) for cross-attention."""
        if isinstance(start, StaticPosition):
            return self.cross_k, self.cross_v, self.source_bias.view(1, 1, 1, -1)
        S = self.source_len
        return self.cross_k[:, :, :S], self.cross_v[:, :, :S], None


class T5Attention(nn.Module):
    """Multi-head attention, unscaled, with an additive position bias; `q k v o` as named."""

    role = "attention"

    def __init__(self, args: ModelArgs, relative_bias: bool = False):
        super().__init__()
        D, inner = args.d_model, args.num_heads * args.d_kv
        self.n_heads, self.head_dim = args.num_heads, args.d_kv
        self.q, self.k, self.v = (nn.Linear(D, inner, bias=False) for _ in range(3))
        self.o = nn.Linear(inner, D, bias=False)
        if relative_bias:
            self.relative_attention_bias = nn.Embedding(args.relative_attention_num_buckets, args.num_heads)
            self.buckets = (args.relative_attention_num_buckets, args.relative_attention_max_distance)

    def heads(self, proj: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        return proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # [B, H, T, Dh]

    def position_bias(self, q_pos: torch.Tensor, k_pos: torch.Tensor, bidirectional: bool) -> torch.Tensor:
        """[1, H, T, S] from query positions [T] and key positions [S]."""
        buckets = relative_position_bucket(k_pos[None, :] - q_pos[:, None], bidirectional, *self.buckets)
        return self.relative_attention_bias(buckets).permute(2, 0, 1).unsqueeze(0)

    def attend(self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """x [B, T, D] over keys / values [B, H, S, Dh], bias [1, H, T, S] (mask folded in) -> [B, T, D]."""
        B, T, _ = x.shape
        scores = torch.matmul(self.heads(self.q, x), k.transpose(2, 3))  # [B, H, T, S]; T5 does not scale
        if bias is not None:
            scores = scores + bias
        probs = torch.softmax(scores.float(), dim=-1).to(v.dtype)
        return self.o(torch.matmul(probs, v).transpose(1, 2).reshape(B, T, -1))


class DenseActDense(nn.Module):
    """The dense feed-forward: wo(relu(wi(x)))."""

    def __init__(self, d_model: int, d_ff: int):
        super().__init__()
        self.wi = nn.Linear(d_model, d_ff, bias=False)
        self.wo = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.wo(F.relu(self.wi(x)))


class Top1Router(nn.Module):
    """The Switch router: softmax of `classifier(x)` in float32, the top-1 expert, its
    probability (in x's dtype, as the reference casts it back) as the weight. Called on
    flat tokens (the expert-cache prefetch guess) it gives (ids [N, 1], weights [N, 1])."""

    role = "routers"
    top_k = 1

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_experts, self.expert_capacity = args.num_experts, args.expert_capacity
        self.classifier = nn.Linear(args.d_model, args.num_experts, bias=args.router_bias)

    def probs(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.classifier.bias is None else self.classifier.bias.float()
        logits = F.linear(x.float(), self.classifier.weight.float(), bias)
        return torch.softmax(logits, dim=-1).to(x.dtype)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        probs = self.probs(x)
        ids = probs.argmax(dim=-1, keepdim=True)
        return ids, probs.gather(-1, ids).float()

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, T, D] -> (ids [B, T], weights [B, T] float32), a token's weight 0 when it
        comes after `expert_capacity` earlier tokens of its sequence (in this call) chose
        the same expert: the reference drops it (its MLP output is 0)."""
        probs = self.probs(x)
        ids = probs.argmax(dim=-1)
        weights = probs.gather(-1, ids[..., None])[..., 0].float()
        chosen = ids[..., None] == torch.arange(self.n_experts, device=ids.device)  # one-hot [B, T, E], no host sync
        priority = torch.cumsum(chosen.long(), dim=1).gather(-1, ids[..., None])[..., 0]
        return ids, weights.masked_fill(priority > self.expert_capacity, 0.0)


class SparseMLP(SparseMoeBlock):
    """`router` + `experts` (RoutedExperts or the expert cache that replaces it)."""

    def __init__(self, args: ModelArgs):
        experts = RoutedExperts(args.num_experts, args.d_model, args.d_ff, act=RELU)
        super().__init__(Top1Router(args), experts, names={"router": "router", "experts": "experts"})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        ids, weights = self.router.route(x)
        return self.experts(x.reshape(-1, D), ids.reshape(-1, 1), weights.reshape(-1, 1)).reshape(B, T, D)


class LayerFF(nn.Module):
    def __init__(self, args: ModelArgs, sparse: bool):
        super().__init__()
        self.mlp = SparseMLP(args) if sparse else DenseActDense(args.d_model, args.d_ff)
        self.layer_norm = RMSNorm(args.d_model, args.layer_norm_epsilon)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(self.layer_norm(x))


class LayerSelfAttention(nn.Module):
    def __init__(self, args: ModelArgs, relative_bias: bool):
        super().__init__()
        self.SelfAttention = T5Attention(args, relative_bias)
        self.layer_norm = RMSNorm(args.d_model, args.layer_norm_epsilon)


class LayerCrossAttention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.EncDecAttention = T5Attention(args)
        self.layer_norm = RMSNorm(args.d_model, args.layer_norm_epsilon)


class Block(nn.Module):
    """`layer`: [self-attention, (cross-attention,) feed-forward], as the checkpoint names them."""

    def __init__(self, args: ModelArgs, i: int, decoder: bool):
        super().__init__()
        parts = [LayerSelfAttention(args, relative_bias=i == 0)]
        if decoder:
            parts.append(LayerCrossAttention(args))
        parts.append(LayerFF(args, args.is_sparse(i, decoder)))
        self.layer = nn.ModuleList(parts)

    @property
    def self_attention(self) -> T5Attention:
        return self.layer[0].SelfAttention


class Stack(nn.Module):
    def __init__(self, args: ModelArgs, decoder: bool):
        super().__init__()
        n = args.num_decoder_layers if decoder else args.num_layers
        if not args.tie_word_embeddings:
            # Untied, each stack reads its own table (transformers 5.25 saves and uses them);
            # tied, both are `shared`.
            self.embed_tokens = nn.Embedding(args.vocab_size, args.d_model)
            self.embed_tokens.role = "embeddings"
        self.block = nn.ModuleList([Block(args, i, decoder) for i in range(n)])
        self.final_layer_norm = RMSNorm(args.d_model, args.layer_norm_epsilon)

    def embed(self, input_ids: torch.Tensor, shared: nn.Embedding) -> torch.Tensor:
        return getattr(self, "embed_tokens", shared)(input_ids)


class Model(nn.Module):
    """SwitchTransformersForConditionalGeneration with the checkpoint's names (`shared`,
    `encoder.block.N.layer.M...`, `decoder...`, `lm_head`). forward() is the decoder (the
    interface generation drives, as for the decoder-only families); encode() runs the
    encoder into the decoder states first."""

    is_encoder_decoder = True

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.shared = nn.Embedding(args.vocab_size, args.d_model)
        self.shared.role = "embeddings"
        self.encoder = Stack(args, decoder=False)
        self.decoder = Stack(args, decoder=True)
        self.lm_head = nn.Linear(args.d_model, args.vocab_size, bias=False)
        self.lm_head.role = "lm_head"
        self.tie_weights()

    @property
    def decoder_start_token_id(self) -> int:
        return int(self.args.decoder_start_token_id)

    def tie_weights(self) -> None:
        if self.args.tie_word_embeddings:
            self.lm_head.weight = self.shared.weight

    def layer_paths(self) -> list[str]:
        return layer_paths(self.args)

    def state_specs(self) -> list[StateSpec]:
        """Encoder blocks keep nothing; a decoder block its self-attention K/V and the
        encoder output's K/V for cross-attention, and the mask of the latter (at most the
        context's worth of each)."""
        a = self.args
        return [StateSpec(0)] * a.num_layers + [StateSpec(4 * a.num_heads * a.d_kv + 1)] * a.num_decoder_layers

    def make_caches(self, batch: int, max_len: int) -> list[DecoderState | None]:
        ref, a = self.shared.weight, self.args
        return [None] * a.num_layers + [
            DecoderState(batch, a.num_heads, max_len, a.d_kv, ref.dtype, ref.device)
            for _ in range(a.num_decoder_layers)
        ]

    def encode(self, input_ids: torch.Tensor, caches: list[DecoderState | None]) -> None:
        """Run the encoder over input_ids [B, S] and write each decoder layer's
        cross-attention keys and values into its state."""
        states = caches[self.args.num_layers :]
        S = input_ids.shape[1]
        if S > states[0].max_len:
            raise context_full(S, states[0].max_len)  # before any work
        x = self.encoder.embed(input_ids, self.shared)
        pos = torch.arange(S, device=x.device)
        bias = self.encoder.block[0].self_attention.position_bias(pos, pos, bidirectional=True)
        for block in self.encoder.block:
            sa = block.layer[0]
            h = sa.layer_norm(x)
            att = sa.SelfAttention
            x = x + att.attend(h, att.heads(att.k, h), att.heads(att.v, h), bias)
            x = block.layer[-1](x)
        enc = self.encoder.final_layer_norm(x)  # [B, S, D]
        for block, state in zip(self.decoder.block, states):
            cross = block.layer[1].EncDecAttention
            state.set_source(cross.heads(cross.k, enc), cross.heads(cross.v, enc))

    def forward(self, input_ids: torch.Tensor, caches: list, start: Start = 0, last_only: bool = False) -> torch.Tensor:
        """Decoder ids [B, T] at positions [start, start+T), after encode() -> logits [B, T, V]."""
        states = caches[self.args.num_layers :]
        T = input_ids.shape[1]
        x = self.decoder.embed(input_ids, self.shared)
        q_pos = token_positions(start, T, x.device)
        k_pos = key_positions(start, T, x.device)
        bias = self.decoder.block[0].self_attention.position_bias(q_pos, k_pos, bidirectional=False)
        causal = (k_pos[None, :] <= q_pos[:, None]).view(1, 1, T, -1)
        bias = bias.masked_fill(~causal, float("-inf"))
        for block, state in zip(self.decoder.block, states):
            sa, ca = block.layer[0], block.layer[1]
            h = sa.layer_norm(x)
            att = sa.SelfAttention
            k, v, _ = state.update(att.heads(att.k, h), att.heads(att.v, h), start)
            x = x + att.attend(h, k, v, bias)
            x = x + ca.EncDecAttention.attend(ca.layer_norm(x), *state.source(start))
            x = block.layer[-1](x)
        if last_only:
            x = x[:, -1:]
        x = self.decoder.final_layer_norm(x)
        if self.args.tie_word_embeddings:
            x = x * self.args.d_model**-0.5  # Mesh TensorFlow's rescale before the tied projection
        return self.lm_head(x)


def sanitize(weights: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    """Checkpoint names -> ours: only the experts differ (`experts.expert_{e}.wi/wo` ->
    stacked `experts.w13` [E, I, D], `experts.w2` [E, D, I]). Tied, the copies of the
    embeddings some exporters save are dropped; untied, a stack whose own table is not
    saved (older exporters) reads `shared`, as the reference then does."""
    weights = dict(weights)
    for name in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight"):
        if args.tie_word_embeddings:
            weights.pop(name, None)
        elif name not in weights and "shared.weight" in weights:
            weights[name] = weights["shared.weight"]
    if args.tie_word_embeddings:
        weights.pop("lm_head.weight", None)
    for stack, n, ff in (("encoder", args.num_layers, 1), ("decoder", args.num_decoder_layers, 2)):
        for i in range(n):
            prefix = f"{stack}.block.{i}.layer.{ff}.mlp.experts"
            if f"{prefix}.expert_0.wi.weight" not in weights:
                continue  # dense, or already stacked
            wi, wo = [], []
            for e in range(args.num_experts):
                for name, out in (("wi", wi), ("wo", wo)):
                    key = f"{prefix}.expert_{e}.{name}.weight"
                    if key not in weights:
                        raise MoerunError(f"tensor {key} is missing from the checkpoint")
                    out.append(weights.pop(key))
            weights[f"{prefix}.w13"], weights[f"{prefix}.w2"] = torch.stack(wi), torch.stack(wo)
    return weights


def checkpoint_tensors(args: ModelArgs) -> dict:
    """The released checkpoint's tensors: name -> (shape, stored dtype, role)."""
    stored = {"float32": "F32", "float16": "F16"}.get(args.torch_dtype or args.dtype or "", "BF16")
    t = CheckpointLayout(args, dtype=stored)
    D, I, E, inner = args.d_model, args.d_ff, args.num_experts, args.num_heads * args.d_kv
    t.add("shared.weight", (args.vocab_size, D), "embeddings")
    if not args.tie_word_embeddings:
        for stack in ("encoder", "decoder"):
            t.add(f"{stack}.embed_tokens.weight", (args.vocab_size, D), "embeddings")

    def attention(prefix: str, relative_bias: bool) -> None:
        for proj in ("q", "k", "v"):
            t.linear(f"{prefix}.{proj}", inner, D, "attention")
        t.linear(f"{prefix}.o", D, inner, "attention")
        if relative_bias:
            t.add(
                f"{prefix}.relative_attention_bias.weight",
                (args.relative_attention_num_buckets, args.num_heads),
                "attention",
            )

    for stack, n, decoder in (("encoder", args.num_layers, False), ("decoder", args.num_decoder_layers, True)):
        for i in range(n):
            p = f"{stack}.block.{i}.layer"
            attention(f"{p}.0.SelfAttention", i == 0)
            t.add(f"{p}.0.layer_norm.weight", (D,), "norms")
            if decoder:
                attention(f"{p}.1.EncDecAttention", False)
                t.add(f"{p}.1.layer_norm.weight", (D,), "norms")
            ff = f"{p}.{2 if decoder else 1}"
            t.add(f"{ff}.layer_norm.weight", (D,), "norms")
            if args.is_sparse(i, decoder):
                t.linear(f"{ff}.mlp.router.classifier", E, D, "routers", args.router_bias)
                for e in range(E):
                    t.linear(f"{ff}.mlp.experts.expert_{e}.wi", I, D, "routed_experts")
                    t.linear(f"{ff}.mlp.experts.expert_{e}.wo", D, I, "routed_experts")
            else:
                t.linear(f"{ff}.mlp.wi", I, D, "dense_mlp")
                t.linear(f"{ff}.mlp.wo", D, I, "dense_mlp")
        t.add(f"{stack}.final_layer_norm.weight", (D,), "norms")
    if not args.tie_word_embeddings:
        t.linear("lm_head", args.vocab_size, D, "lm_head")
    return t.tensors
