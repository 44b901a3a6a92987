"""What every architecture file builds on: config parsing, the decoder stack, the MoE
block, the causal-LM head, parameter roles for the planner, and the helper that stacks
per-expert checkpoint tensors.

Shape legend: B batch, T tokens, D hidden, V vocab, E experts.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from moerun.errors import MoerunError
from moerun.layers import Attention, LayerState, RMSNorm, Start, StateSpec


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


@dataclasses.dataclass(kw_only=True)
class TransformerArgs(BaseModelArgs):
    """The config.json fields every decoder-only family shares. A family's ModelArgs
    subclasses it (also kw_only, so its own required fields may follow these defaults)
    and redeclares a field to change its default."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 4096
    rope_theta: float | None = None
    rope_parameters: dict | None = None
    rope_scaling: dict | None = None

    def __post_init__(self):
        self.num_key_value_heads = self.num_key_value_heads or self.num_attention_heads
        self.head_dim = self.head_dim or self.hidden_size // self.num_attention_heads

    def rotary(self, default_theta: float = 10000.0, **options):
        """The RoPE this config asks for (moerun.rope.rotary_for), over head_dim."""
        from moerun.rope import rotary_for

        return rotary_for(dataclasses.asdict(self), self.head_dim, default_theta, **options)


def attention_layer(args, rope, ffn: nn.Module, ffn_name: str = "mlp", **options) -> "DecoderLayer":
    """The usual decoder layer: the shared Attention (its options as keywords) over the
    config's heads, then `ffn` under its checkpoint name."""
    attn = Attention(args.hidden_size, args.num_attention_heads, args.num_key_value_heads, args.head_dim, rope, **options)
    return DecoderLayer(attn, ffn, ffn_name, args.hidden_size, args.rms_norm_eps)


def parameter_roles(model: nn.Module) -> dict[str, str]:
    """Each parameter's role for the planner ("attention", "routed_experts", ...; see
    moerun.plan.ROLES), named as model.named_parameters() names it. A module says its role
    with a `role` attribute (a class attribute of the shared modules, or set on an
    instance); the outermost module on a parameter's path that has one decides, so a q/k
    norm inside attention counts as attention and a shared expert's projections as
    shared experts."""
    roles = {}
    modules = dict(model.named_modules())
    for name, _ in model.named_parameters():
        parts = name.split(".")
        role = None
        for i in range(1, len(parts)):
            role = getattr(modules[".".join(parts[:i])], "role", None)
            if role:
                break
        roles[name] = role or "dense_mlp"
    return roles


class DecoderLayer(nn.Module):
    """Pre-norm residual block: x + mixer(norm(x)), then h + ffn(norm(h)). The mixer
    (attention, latent attention, later a recurrent layer) and the feed-forward keep their
    checkpoint attribute names (`self_attn`; `block_sparse_moe` for Mixtral, `mlp` for
    Qwen). `residual_scale` multiplies both branches (Granite's residual_multiplier)."""

    def __init__(self, mixer: nn.Module, ffn: nn.Module, ffn_name: str, hidden_size: int, eps: float,
                 mixer_name: str = "self_attn", residual_scale: float = 1.0):  # fmt: skip
        super().__init__()
        self.input_layernorm = RMSNorm(hidden_size, eps)
        self.mixer_name, self.ffn_name = mixer_name, ffn_name
        setattr(self, mixer_name, mixer)
        self.post_attention_layernorm = RMSNorm(hidden_size, eps)
        setattr(self, ffn_name, ffn)
        self.residual_scale = residual_scale

    @property
    def mixer(self) -> nn.Module:
        return getattr(self, self.mixer_name)

    @property
    def ffn(self) -> nn.Module:
        return getattr(self, self.ffn_name)

    def forward(self, x: torch.Tensor, state: LayerState, start: Start) -> torch.Tensor:
        if self.residual_scale != 1.0:
            h = x + self.mixer(self.input_layernorm(x), state, start) * self.residual_scale
            return h + self.ffn(self.post_attention_layernorm(h)) * self.residual_scale
        h = x + self.mixer(self.input_layernorm(x), state, start)
        return h + self.ffn(self.post_attention_layernorm(h))


class MixerBlock(nn.Module):
    """Pre-norm residual block of one mixer and no separate feed-forward: x + mixer(norm(x))
    (Nemotron-H, whose blocks are each Mamba-2, attention, an MLP or an MoE). A mixer that
    keeps state (`make_state`) gets it and the position; any other gets x alone."""

    def __init__(self, mixer: nn.Module, hidden_size: int, eps: float, mixer_name: str = "mixer",
                 norm: nn.Module | None = None):  # fmt: skip
        super().__init__()
        self.norm = norm if norm is not None else RMSNorm(hidden_size, eps)
        self.mixer_name = mixer_name
        setattr(self, mixer_name, mixer)
        self.stateful = hasattr(mixer, "make_state")

    @property
    def mixer(self) -> nn.Module:
        return self._modules[self.mixer_name]  # not getattr: the name may be "mixer" itself

    def forward(self, x: torch.Tensor, state: LayerState | None, start: Start) -> torch.Tensor:
        h = self.norm(x)
        return x + (self.mixer(h, state, start) if self.stateful else self.mixer(h))


class Backbone(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int, layers: list[nn.Module], eps: float):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab_size, hidden_size)
        self.embed_tokens.role = "embeddings"
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(hidden_size, eps)


class CausalLM(nn.Module):
    """Decoder-only LM with checkpoint-compatible names (`model.layers.N...`, `lm_head`).

    `embedding_scale` multiplies the embeddings and `logits_scale` divides the logits
    (Granite's multipliers). A tied lm_head is the embedding table itself."""

    def __init__(self, args, layers: list[DecoderLayer], embedding_scale: float = 1.0, logits_scale: float = 1.0,
                 lm_head_bias: bool = False):  # fmt: skip
        super().__init__()
        self.args = args
        self.model = Backbone(args.vocab_size, args.hidden_size, layers, args.rms_norm_eps)
        self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=lm_head_bias)
        self.lm_head.role = "lm_head"
        self.embedding_scale, self.logits_scale = embedding_scale, logits_scale
        self.tie_weights()

    def tie_weights(self) -> None:
        """With tie_word_embeddings the lm_head shares the embedding table (counted once)."""
        if getattr(self.args, "tie_word_embeddings", False):
            self.lm_head.weight = self.model.embed_tokens.weight

    def state_specs(self) -> list[StateSpec]:
        """What each layer's decode state costs (the planner's reading); a layer whose
        mixer keeps none (an MLP-only block) costs nothing."""
        return [layer.mixer.state_spec() if hasattr(layer.mixer, "state_spec") else StateSpec(0)
                for layer in self.model.layers]  # fmt: skip

    def make_caches(self, batch: int, max_len: int) -> list[LayerState | None]:
        """One state object per layer (each mixer makes its own, None when it keeps none),
        for max_len positions."""
        ref = self.model.embed_tokens.weight
        return [layer.mixer.make_state(batch, max_len, ref.dtype, ref.device) if hasattr(layer.mixer, "make_state")
                else None for layer in self.model.layers]  # fmt: skip

    def forward(
        self, input_ids: torch.Tensor, caches: list[LayerState], start: Start = 0, last_only: bool = False
    ) -> torch.Tensor:
        """input_ids [B, T] at positions [start, start+T) -> logits [B, T, V] (or [B, 1, V]
        with last_only, which spares the vocab projection of every prompt token). `start`
        may be a StaticPosition: a one-token step with fixed shapes, for CUDA graphs."""
        x = self.model.embed_tokens(input_ids)
        if self.embedding_scale != 1.0:
            x = x * self.embedding_scale
        for layer, cache in zip(self.model.layers, caches):
            x = layer(x, cache, start)
        if last_only:
            x = x[:, -1:]
        logits = self.lm_head(self.model.norm(x))
        return logits / self.logits_scale if self.logits_scale != 1.0 else logits


class SparseMoeBlock(nn.Module):
    """An MoE feed-forward: `router` (moerun.moe.routing.Router, or anything whose call
    gives (ids, weights) for flat tokens) picks experts, `experts` (RoutedExperts, or the
    expert cache that replaces it) computes them, optional `shared` experts (an MLP, its
    output scaled by sigmoid(shared_gate(x)) when `shared_gate` is set, Qwen2-MoE) are
    added. The attribute names are the checkpoint's; a family passes them."""

    def __init__(self, router: nn.Module, experts: nn.Module, shared: nn.Module | None = None,
                 shared_gate: nn.Module | None = None, names: dict | None = None):  # fmt: skip
        super().__init__()
        names = {"router": "gate", "experts": "experts", "shared": "shared_expert",
                 "shared_gate": "shared_expert_gate", **(names or {})}  # fmt: skip
        self._names = names
        self._modules[names["router"]] = router
        self._modules[names["experts"]] = experts
        if shared is not None:
            shared.role = "shared_experts"
            self._modules[names["shared"]] = shared
        if shared_gate is not None:
            shared_gate.role = "shared_experts"
            self._modules[names["shared_gate"]] = shared_gate
        self.has_shared, self.has_shared_gate = shared is not None, shared_gate is not None

    # Modules are registered under the checkpoint's names; these read them whatever those are.
    @property
    def router(self) -> nn.Module:
        return self._modules[self._names["router"]]

    @property
    def experts(self) -> nn.Module:
        return self._modules[self._names["experts"]]

    @property
    def top_k(self) -> int:
        return self.router.top_k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])  # [N, D]
        ids, weights = self.router(flat)
        out = self.experts(flat, ids, weights)
        if self.has_shared:
            shared = self._modules[self._names["shared"]](flat)
            if self.has_shared_gate:
                shared = torch.sigmoid(self._modules[self._names["shared_gate"]](flat)) * shared
            out = out + shared
        return out.reshape(shape)


class CheckpointLayout:
    """A family's description of its released checkpoint, built name by name in its
    `checkpoint_tensors(args)`: name -> (shape, stored dtype as safetensors names it,
    role). The planner reads stored bytes by role from it (offline, from a shipped
    config) or looks real headers up in it (a name it lacks is not loaded: a vision
    tower, a multi-token-prediction layer); the loader skips the routed experts by it."""

    def __init__(self, args, dtype: str = "BF16", prefix: str = ""):
        self.args, self.dtype, self.prefix = args, dtype, prefix
        self.tensors: dict[str, tuple[tuple[int, ...], str, str]] = {}

    def add(self, name: str, shape, role: str, dtype: str | None = None) -> None:
        self.tensors[self.prefix + name] = (tuple(int(s) for s in shape), dtype or self.dtype, role)

    def linear(self, name: str, n_out: int, n_in: int, role: str, bias: bool = False) -> None:
        self.add(f"{name}.weight", (n_out, n_in), role)
        if bias:
            self.add(f"{name}.bias", (n_out,), role)

    def swiglu(self, prefix: str, inter: int, role: str, names=("gate_proj", "up_proj", "down_proj"),
               bias: bool = False) -> None:  # fmt: skip
        D = self.args.hidden_size
        self.linear(f"{prefix}.{names[0]}", inter, D, role, bias)
        self.linear(f"{prefix}.{names[1]}", inter, D, role, bias)
        self.linear(f"{prefix}.{names[2]}", D, inter, role, bias)

    def embeddings(self) -> None:
        self.add("model.embed_tokens.weight", (self.args.vocab_size, self.args.hidden_size), "embeddings")

    def decoder_norms(self, layer: str, bias: bool = False) -> None:
        for norm in ("input_layernorm", "post_attention_layernorm"):
            self.add(f"{layer}.{norm}.weight", (self.args.hidden_size,), "norms")
            if bias:
                self.add(f"{layer}.{norm}.bias", (self.args.hidden_size,), "norms")

    def attention(self, prefix: str, n_heads: int, n_kv: int, head_dim: int, qkv_bias: bool = False,
                  o_bias: bool = False, qk_norm: str | None = None) -> None:  # fmt: skip
        D = self.args.hidden_size
        self.linear(f"{prefix}.q_proj", n_heads * head_dim, D, "attention", qkv_bias)
        self.linear(f"{prefix}.k_proj", n_kv * head_dim, D, "attention", qkv_bias)
        self.linear(f"{prefix}.v_proj", n_kv * head_dim, D, "attention", qkv_bias)
        self.linear(f"{prefix}.o_proj", D, n_heads * head_dim, "attention", o_bias)
        if qk_norm == "head":
            self.add(f"{prefix}.q_norm.weight", (head_dim,), "attention")
            self.add(f"{prefix}.k_norm.weight", (head_dim,), "attention")
        elif qk_norm == "full":
            self.add(f"{prefix}.q_norm.weight", (n_heads * head_dim,), "attention")
            self.add(f"{prefix}.k_norm.weight", (n_kv * head_dim,), "attention")

    def attention_layer(self, layer: str, qkv_bias: bool = False, o_bias: bool = False,
                        qk_norm: str | None = None) -> None:  # fmt: skip
        """A layer's two norms and its `self_attn` over the config's heads."""
        a = self.args
        self.decoder_norms(layer)
        self.attention(f"{layer}.self_attn", a.num_attention_heads, a.num_key_value_heads, a.head_dim, qkv_bias,
                       o_bias, qk_norm)  # fmt: skip

    def experts(self, prefix: str, n_experts: int, inter: int, names=("gate_proj", "up_proj", "down_proj")) -> None:
        """Routed experts stored one tensor per expert and projection: `{prefix}.{e}.{name}.weight`."""
        for e in range(n_experts):
            self.swiglu(f"{prefix}.{e}", inter, "routed_experts", names)

    def final(self, norm_bias: bool = False, lm_head_bias: bool = False) -> None:
        """The final norm, and the lm_head unless tied to the embeddings."""
        D, V = self.args.hidden_size, self.args.vocab_size
        self.add("model.norm.weight", (D,), "norms")
        if norm_bias:
            self.add("model.norm.bias", (D,), "norms")
        if not getattr(self.args, "tie_word_embeddings", False):
            self.linear("lm_head", V, D, "lm_head", lm_head_bias)


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
