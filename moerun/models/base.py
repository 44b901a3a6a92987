"""What every architecture file builds on: config parsing, the decoder stack, the MoE
block, the causal-LM head, parameter roles for the planner, and the helper that stacks
per-expert checkpoint tensors.

Shape legend: B batch, T tokens, D hidden, V vocab, E experts.
"""

from __future__ import annotations

import dataclasses
import json
import re
import types
import typing
from typing import Iterator

import torch
from torch import nn

from moerun.config_checks import check_plausible
from moerun.errors import MoerunError
from moerun.layers import Attention, LayerState, RMSNorm, Start, StateSpec


@dataclasses.dataclass(frozen=True)
class Spec:
    """What a config field must hold beyond its annotated type (which from_dict checks
    too): `minimum` (a number below it is refused; null passes where the type allows
    it), `choices` (the only values moerun implements), `top_k_of` (the field holding
    the expert count this experts-per-token count must not exceed: 1 <= top-k <= count
    whenever the model has routed experts)."""

    minimum: float | None = None
    choices: tuple | None = None
    top_k_of: str | None = None


def spec(
    default=dataclasses.MISSING, *, minimum=None, choices=None, top_k_of=None, default_factory=dataclasses.MISSING
):
    """A config field with its checks (see Spec). A subclass that redeclares the field
    with a plain default keeps its parent's checks; one that redeclares it with spec()
    replaces them."""
    return dataclasses.field(
        default=default, default_factory=default_factory, metadata={"spec": Spec(minimum, choices, top_k_of)}
    )


_TYPE_WORDS = {
    int: "a whole number",
    float: "a number",
    bool: "true or false",
    str: "text",
    list: "a list",
    dict: "an object",
    type(None): "null",
}


def _type_members(tp) -> tuple | None:
    """The plain types an annotation allows (int | None -> (int, NoneType)); None when
    it is not one from_dict can check (Any, a class)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        members = [_type_members(t) for t in typing.get_args(tp)]
        return None if any(m is None for m in members) else tuple(t for m in members for t in m)
    tp = origin or tp
    return (tp,) if tp in _TYPE_WORDS else None


def _admits_none(annotation) -> bool:
    """Whether a field's annotation allows None (an unknown one is taken to: unchecked)."""
    allowed = _type_members(annotation) if annotation is not None else None
    return allowed is None or type(None) in allowed


def _conform(value, allowed: tuple):
    """`value` as one of the `allowed` types (2.0 for an int field is 2), or the marker
    _WRONG. bool is not a number here, and a number is not a bool but 0 or 1."""
    if value is None:
        return value if type(None) in allowed else _WRONG
    if isinstance(value, bool):
        return value if bool in allowed else _WRONG
    if isinstance(value, int):
        if int in allowed:
            return value
        if float in allowed:
            return float(value)
        return bool(value) if bool in allowed and value in (0, 1) else _WRONG
    if isinstance(value, float):
        if float in allowed:
            return value
        return int(value) if int in allowed and value.is_integer() else _WRONG
    return value if type(value) in allowed else _WRONG


_WRONG = object()


@dataclasses.dataclass
class BaseModelArgs:
    """Fields are named exactly as in config.json; unknown keys are ignored. from_dict
    checks each value it takes against the field's annotated type and its Spec (see
    spec()), naming the key and the file, so a bad config is refused in one line before
    a model is built from it. A null where the type admits none reads as the key unset."""

    # A family whose multimodal release nests the text model's config in `text_config`
    # (Llama 4, Qwen3.5) reads it from there; its text-only checkpoints have it flat.
    nested_text_config: typing.ClassVar[bool] = False

    @classmethod
    def from_dict(cls, config: dict, source: str = "config.json"):
        text = config.get("text_config") if cls.nested_text_config else None
        if isinstance(text, dict):
            config, source = {**text, "model_type": config.get("model_type")}, f"{source} (text_config)"
        fields = dataclasses.fields(cls)
        missing = [
            f.name
            for f in fields
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING and f.name not in config
        ]
        if missing:
            raise MoerunError(f"{source} lacks {', '.join(missing)} (needed by {config.get('model_type')})")
        hints = _field_hints(cls)
        values = {}
        for f in fields:
            if f.name in config and config[f.name] is None and not _admits_none(hints.get(f.name)):
                # A null in a saved config means "not set" (transformers writes its unset
                # optional keys as null): the field's default. Where the family's type admits
                # None, null keeps its own meaning there (q_lora_rank: null = no compression).
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                    raise MoerunError(f"{source}: {f.name} is null, and {config.get('model_type')} needs a value")
                continue
            if f.name in config:
                values[f.name] = _checked_value(
                    f.name, config[f.name], hints.get(f.name), field_spec(cls, f.name), source
                )
        check_plausible(values, source)  # before __post_init__, which may loop over the layers
        args = cls(**values)
        args._check_routing(source)
        return args

    def _check_routing(self, source: str) -> None:
        """Experts per token within 1..the expert count, when the model routes at all (an
        expert count of 0 or null, or no MoE layer, is a dense model)."""
        for f in dataclasses.fields(self):
            counts = field_spec(type(self), f.name).top_k_of
            if counts is None:
                continue
            k, n = getattr(self, f.name), getattr(self, counts)
            if not n or n < 1 or not getattr(self, "moe_layers", True):
                continue
            if not isinstance(k, int) or not 1 <= k <= n:
                raise MoerunError(f"{source}: {f.name} is {json.dumps(k)}, must be 1 to {counts} ({n})")


def field_spec(cls, name: str) -> Spec:
    """The Spec of field `name`: from the nearest class that declared it with spec()."""
    for klass in cls.__mro__:
        f = klass.__dict__.get("__dataclass_fields__", {}).get(name)
        if f is not None and "spec" in f.metadata and name in klass.__dict__.get("__annotations__", {}):
            return f.metadata["spec"]
    return Spec()


def _field_hints(cls) -> dict:
    try:
        return typing.get_type_hints(cls)
    except Exception:  # an annotation that does not evaluate: its types go unchecked
        return {}


def _checked_value(key: str, value, annotation, rule: Spec, source: str):
    shown = json.dumps(value) if isinstance(value, (str, int, float, bool, type(None))) else type(value).__name__
    allowed = _type_members(annotation) if annotation is not None else None
    if allowed is not None:
        conformed = _conform(value, allowed)
        if conformed is _WRONG:
            words = " or ".join(dict.fromkeys(_TYPE_WORDS[t] for t in allowed))
            raise MoerunError(f"{source}: {key} is {shown}, expected {words}")
        value = conformed
    if isinstance(value, float) and value != value:  # NaN: every comparison is false, so no check would see it
        raise MoerunError(f"{source}: {key} is NaN, expected a number")
    if rule.minimum is not None and isinstance(value, (int, float)) and not isinstance(value, bool):
        if not value >= rule.minimum:  # also refuses NaN
            raise MoerunError(f"{source}: {key} is {shown}, must be at least {rule.minimum}")
    if rule.choices is not None and value not in rule.choices:
        raise MoerunError(
            f"{source}: {key} {shown} is not supported (moerun implements {', '.join(map(str, rule.choices))})"
        )
    return value


@dataclasses.dataclass(kw_only=True)
class TransformerArgs(BaseModelArgs):
    """The config.json fields every decoder-only family shares. A family's ModelArgs
    subclasses it (also kw_only, so its own required fields may follow these defaults)
    and redeclares a field to change its default (keeping its checks) or its spec()."""

    model_type: str
    vocab_size: int = spec(minimum=1)
    hidden_size: int = spec(minimum=1)
    intermediate_size: int = spec(minimum=1)
    num_hidden_layers: int = spec(minimum=1)
    num_attention_heads: int = spec(minimum=1)
    num_key_value_heads: int | None = spec(None, minimum=1)
    head_dim: int | None = spec(None, minimum=1)
    rms_norm_eps: float = spec(1e-6, minimum=0)
    tie_word_embeddings: bool = False
    max_position_embeddings: int = spec(4096, minimum=1)
    rope_theta: float | None = spec(None, minimum=0)
    rope_parameters: dict | None = None
    rope_scaling: dict | None = None
    # Every family's feed-forward is a SwiGLU: another activation would silently compute garbage.
    hidden_act: str = spec("silu", choices=("silu",))
    # Multi-token-prediction layers stored after the model's as model.layers.{L}... (DeepSeek-V3,
    # GLM): not run, not loaded; any other layer past num_hidden_layers is refused at load.
    num_nextn_predict_layers: int = spec(0, minimum=0)

    def __post_init__(self):
        self.num_key_value_heads = self.num_key_value_heads or self.num_attention_heads
        self.head_dim = self.head_dim or self.hidden_size // self.num_attention_heads

    def rotary(self, default_theta: float = 10000.0, **options):
        """The RoPE this config asks for (moerun.rope.rotary_for), over head_dim."""
        from moerun.rope import rotary_for

        return rotary_for(dataclasses.asdict(self), self.head_dim, default_theta, **options)


@dataclasses.dataclass(kw_only=True)
class QwenMoeArgs(TransformerArgs):
    """The MoE fields the Qwen families (Qwen2-MoE, Qwen3-MoE, Qwen3-Next) share, and their
    sparse layers (`moe_layers`, see moe_layer_indices). A family redeclares a field to
    change its default."""

    num_experts: int = spec(minimum=0)  # 0: every layer dense
    num_experts_per_tok: int = spec(top_k_of="num_experts")
    moe_intermediate_size: int
    norm_topk_prob: bool = False
    decoder_sparse_step: int = 1
    mlp_only_layers: list[int] = dataclasses.field(default_factory=list)
    max_position_embeddings: int = 32768

    def __post_init__(self):
        super().__post_init__()
        self.moe_layers = moe_layer_indices(
            self.num_hidden_layers, self.num_experts, self.decoder_sparse_step, self.mlp_only_layers
        )


def attention_layer(args, rope, ffn: nn.Module, ffn_name: str = "mlp", **options) -> "DecoderLayer":
    """The usual decoder layer: the shared Attention (its options as keywords) over the
    config's heads, then `ffn` under its checkpoint name."""
    attn = Attention(
        args.hidden_size, args.num_attention_heads, args.num_key_value_heads, args.head_dim, rope, **options
    )
    return DecoderLayer(attn, ffn, ffn_name, args.hidden_size, args.rms_norm_eps)


def is_encoder_decoder(model: nn.Module) -> bool:
    """An encoder-decoder model (the Switch Transformer: the prompt goes to its encoder)
    declares `is_encoder_decoder = True` on its class; the decoder-only families say nothing."""
    return bool(getattr(model, "is_encoder_decoder", False))


def role_of(module: nn.Module) -> str | None:
    """The role a shared module declares ("attention", "shared_experts", "lm_head", ...), if any."""
    return getattr(module, "role", None)


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
            role = role_of(modules[".".join(parts[:i])])
            if role:
                break
        roles[name] = role or "dense_mlp"
    return roles


def linear_parameters(model: nn.Module) -> set[str]:
    """The names of the weights and biases of `model`'s nn.Linear layers (CpuLinear
    included): the matrices a CPU keeps 16-bit while it computes in float32
    (moerun.plan.linear_dtype), but for those a family marks `stays_in_compute_dtype`
    (multiplied with many rows at every decode step, they would be widened every step)."""
    return {
        f"{path}.{leaf}" if path else leaf
        for path, module in model.named_modules()
        if isinstance(module, nn.Linear) and not getattr(module, "stays_in_compute_dtype", False)
        for leaf, _ in module.named_parameters(recurse=False)
    }


class DecoderLayer(nn.Module):
    """Pre-norm residual block: x + mixer(norm(x)), then h + ffn(norm(h)). The mixer
    (attention, latent attention, later a recurrent layer) and the feed-forward keep their
    checkpoint attribute names (`self_attn`; `block_sparse_moe` for Mixtral, `mlp` for
    Qwen). `residual_scale` multiplies both branches (Granite's residual_multiplier)."""

    def __init__(
        self,
        mixer: nn.Module,
        ffn: nn.Module,
        ffn_name: str,
        hidden_size: int,
        eps: float,
        mixer_name: str = "self_attn",
        residual_scale: float = 1.0,
    ):
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

    def __init__(
        self, mixer: nn.Module, hidden_size: int, eps: float, mixer_name: str = "mixer", norm: nn.Module | None = None
    ):
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

    def __init__(
        self,
        args,
        layers: list[DecoderLayer],
        embedding_scale: float = 1.0,
        logits_scale: float = 1.0,
        lm_head_bias: bool = False,
    ):
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

    def layer_paths(self) -> list[str]:
        """The module path of every layer, in order (the expert cache's layer i)."""
        return [f"model.layers.{i}" for i in range(len(self.model.layers))]

    def state_specs(self) -> list[StateSpec]:
        """What each layer's decode state costs (the planner's reading); a layer whose
        mixer keeps none (an MLP-only block) costs nothing."""
        return [
            layer.mixer.state_spec() if hasattr(layer.mixer, "state_spec") else StateSpec(0)
            for layer in self.model.layers
        ]

    def make_caches(self, batch: int, max_len: int) -> list[LayerState | None]:
        """One state object per layer (each mixer makes its own, None when it keeps none),
        for max_len positions."""
        ref = self.model.embed_tokens.weight
        return [
            layer.mixer.make_state(batch, max_len, ref.dtype, ref.device)
            if hasattr(layer.mixer, "make_state")
            else None
            for layer in self.model.layers
        ]

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

    def __init__(
        self,
        router: nn.Module,
        experts: nn.Module,
        shared: nn.Module | None = None,
        shared_gate: nn.Module | None = None,
        names: dict | None = None,
    ):
        super().__init__()
        names = {
            "router": "gate",
            "experts": "experts",
            "shared": "shared_expert",
            "shared_gate": "shared_expert_gate",
            **(names or {}),
        }
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

    @classmethod
    def decoder(cls, args, **options) -> "CheckpointLayout":
        """A decoder-only checkpoint's layout, begun with its embeddings."""
        layout = cls(args, **options)
        layout.embeddings()
        return layout

    def add(self, name: str, shape, role: str, dtype: str | None = None) -> None:
        self.tensors[self.prefix + name] = (tuple(int(s) for s in shape), dtype or self.dtype, role)

    def linear(self, name: str, n_out: int, n_in: int, role: str, bias: bool = False) -> None:
        self.add(f"{name}.weight", (n_out, n_in), role)
        if bias:
            self.add(f"{name}.bias", (n_out,), role)

    def swiglu(
        self, prefix: str, inter: int, role: str, names=("gate_proj", "up_proj", "down_proj"), bias: bool = False
    ) -> None:
        D = self.args.hidden_size
        self.linear(f"{prefix}.{names[0]}", inter, D, role, bias)
        self.linear(f"{prefix}.{names[1]}", inter, D, role, bias)
        self.linear(f"{prefix}.{names[2]}", D, inter, role, bias)

    def layers(self) -> Iterator[tuple[int, str]]:
        """(i, `model.layers.{i}`) for each of the config's layers, in order."""
        return ((i, f"model.layers.{i}") for i in range(self.args.num_hidden_layers))

    def embeddings(self) -> None:
        self.add("model.embed_tokens.weight", (self.args.vocab_size, self.args.hidden_size), "embeddings")

    def decoder_norms(self, layer: str, bias: bool = False) -> None:
        for norm in ("input_layernorm", "post_attention_layernorm"):
            self.add(f"{layer}.{norm}.weight", (self.args.hidden_size,), "norms")
            if bias:
                self.add(f"{layer}.{norm}.bias", (self.args.hidden_size,), "norms")

    def attention(self, prefix: str, qkv_bias: bool = False, o_bias: bool = False, qk_norm: str | None = None) -> None:
        """Attention under `prefix` over the config's heads (q/k/v/o, and the q/k norms)."""
        a = self.args
        D, n_heads, n_kv, head_dim = a.hidden_size, a.num_attention_heads, a.num_key_value_heads, a.head_dim
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

    def attention_layer(
        self, layer: str, qkv_bias: bool = False, o_bias: bool = False, qk_norm: str | None = None
    ) -> None:
        """A layer's two norms and its `self_attn` over the config's heads."""
        self.decoder_norms(layer)
        self.attention(f"{layer}.self_attn", qkv_bias, o_bias, qk_norm)

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
    return {i for i in range(n_layers) if i not in only_dense and n_experts > 0 and (i + 1) % step == 0}


def stack_experts(weights: dict[str, torch.Tensor], prefix: str, n_experts: int, gate: str, up: str, down: str) -> None:
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
            raise MoerunError(f"tensor {prefix}.{e}.{up}.weight has shape {list(u.shape)}, expected {list(g.shape)}")
        pair = torch.cat([g, u], dim=0)
        if w13 and pair.shape != w13[0].shape:
            raise MoerunError(
                f"tensor {prefix}.{e}.{gate}.weight has shape {list(g.shape)}, expected {[w13[0].shape[0] // 2, w13[0].shape[1]]}"
            )
        if w2 and d.shape != w2[0].shape:
            raise MoerunError(
                f"tensor {prefix}.{e}.{down}.weight has shape {list(d.shape)}, expected {list(w2[0].shape)}"
            )
        w13.append(pair)
        w2.append(d)
    weights[f"{prefix}.w13"] = torch.stack(w13)
    weights[f"{prefix}.w2"] = torch.stack(w2)


def stacked_experts(
    weights: dict[str, torch.Tensor],
    layers,
    experts: str,
    n_experts: int,
    names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj"),
) -> dict[str, torch.Tensor]:
    """A copy of `weights` with the experts of each layer i in `layers` stacked
    (stack_experts on `model.layers.{i}.{experts}`, their per-expert `names` gate, up,
    down): the whole sanitize of a family whose checkpoint differs from the model only there."""
    weights = dict(weights)
    for i in layers:
        stack_experts(weights, f"model.layers.{i}.{experts}", n_experts, *names)
    return weights


_LAYER_NAME = re.compile(r"^model\.layers\.(\d+)\.")


class Family:
    """One family file seen through the contract every family keeps (docs/ARCHITECTURE.md):
    callers ask this object, never a module for a hook it may lack.

    Required in the file: `ModelArgs`, `Model`, `sanitize(weights, args)`,
    `checkpoint_tensors(args)`. Optional, each with its default here: `CHECKPOINT_PREFIX`
    (""), `FLOAT32_PARAMS` (()), `TOOL_CALL_FORMAT` (None), `other_checkpoint_layouts(args)`
    (none), `check_loadable(args)` (everything loads), `layer_paths(args)` and
    `layer_of(name, args)` (`model.layers.N`), `first_layers(config, n)` (num_hidden_layers
    cut to n)."""

    REQUIRED = ("ModelArgs", "Model", "sanitize", "checkpoint_tensors")

    def __init__(self, module: types.ModuleType):
        missing = [n for n in self.REQUIRED if n not in vars(module)]
        if missing:
            raise TypeError(f"{module.__name__} lacks {', '.join(missing)} (the family contract)")
        self._hooks = vars(module)
        self.name = module.__name__.rpartition(".")[2]
        self.ModelArgs = module.ModelArgs
        self.Model = module.Model
        prefix = self._hooks.get("CHECKPOINT_PREFIX", "")
        # Checkpoint prefix -> ours: the text model's names under a prefix (Llama 4's
        # `language_model.`), or a dict when they differ by part (Qwen3.5).
        self.checkpoint_prefixes = list(prefix.items()) if isinstance(prefix, dict) else [(prefix, "")]
        self.float32_params: tuple[str, ...] = tuple(self._hooks.get("FLOAT32_PARAMS", ()))
        self.tool_call_format: str | None = self._hooks.get("TOOL_CALL_FORMAT")

    def __repr__(self) -> str:
        return f"Family({self.name})"

    def sanitize(self, weights: dict, args) -> dict:
        return self._hooks["sanitize"](weights, args)

    def checkpoint_tensors(self, args) -> dict:
        return self._hooks["checkpoint_tensors"](args)

    def checkpoint_layouts(self, args) -> list[dict]:
        """Every checkpoint layout the family reads, its released one first (the one `fit`
        counts): Qwen3.5 also reads its experts fused, or one tensor per expert."""
        others = self._hooks.get("other_checkpoint_layouts")
        return [self.checkpoint_tensors(args)] + (others(args) if others else [])

    def routed_checkpoint_names(self, args, names) -> set[str]:
        """The checkpoint tensors among `names` that hold routed experts, by the layouts."""
        layouts = self.checkpoint_layouts(args)
        return {n for n in names if any(n in layout and layout[n][2] == "routed_experts" for layout in layouts)}

    def text_model_name(self, name: str) -> str | None:
        """Checkpoint tensor `name` under the model's own naming, or None when it is not the
        text model's (a vision tower, a projector)."""
        for theirs, ours in self.checkpoint_prefixes:
            if name.startswith(theirs):
                return ours + name[len(theirs) :]
        return None

    def check_loadable(self, args) -> None:
        """Refuse, at load, a storage format moerun cannot read yet (fit still plans it)."""
        hook = self._hooks.get("check_loadable")
        if hook:
            hook(args)

    def layer_paths(self, args) -> list[str]:
        """The module path of every layer, in the model's order (the expert cache's and
        the planner's layer i)."""
        hook = self._hooks.get("layer_paths")
        return hook(args) if hook else [f"model.layers.{i}" for i in range(args.num_hidden_layers)]

    def layer_of(self, name: str, args) -> int | None:
        """The layer a tensor (under our names) belongs to, None for the rest: the loader
        reads one layer's tensors at a time."""
        hook = self._hooks.get("layer_of")
        if hook:
            return hook(name, args)
        m = _LAYER_NAME.match(name)
        return int(m.group(1)) if m else None

    def first_layers(self, config: dict, layers: int) -> str:
        """Keep the first `layers` layers of `config` (in place; a synthetic bench of a
        slice) -> a note saying so, "" when the model has no more than that."""
        hook = self._hooks.get("first_layers")
        if hook:
            return hook(config, layers)
        total = config.get("num_hidden_layers", layers)
        if layers >= total:
            return ""
        config["num_hidden_layers"] = layers
        return f"first {layers} of {total} layers"
