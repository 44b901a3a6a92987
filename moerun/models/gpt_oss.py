"""gpt-oss (openai/gpt-oss-20b, gpt-oss-120b): GQA attention with qkv/o biases, a learned
per-head "sink" logit in every softmax denominator, a sliding window on the layers
`layer_types` marks, YaRN RoPE; an MoE block per layer whose router (with bias) takes
the top-k logits and softmaxes over those k, and experts with biases and a clamped SwiGLU.

Checkpoints store experts stacked with gate and up INTERLEAVED on the output dim
(`gate_up_proj` [E, D, 2I]: gate = [..., ::2], up = [..., 1::2]), either in bf16
(what transformers saves) or as MXFP4 `_blocks`/`_scales` (the released checkpoints,
config.json's quantization_config.quant_method "mxfp4").

Shape legend: D hidden, E experts, H query heads, K kv heads, Dh head dim, I expert intermediate.
"""

from __future__ import annotations

import dataclasses

import torch

from moerun.layers import RMSNorm
from moerun.models.base import CausalLM, CheckpointLayout, SparseMoeBlock, TransformerArgs, attention_layer, spec
from moerun.moe.experts import ExpertActivation, RoutedExperts
from moerun.moe.routing import Router
from moerun.quant import mxfp4

# The tool-call format its chat template writes (moerun/tool_calls.py): gpt-oss replies in harmony:
# analysis / final channels, calls to `functions.NAME`.
TOOL_CALL_FORMAT = "harmony"

# The reference keeps the norms in float32 whatever the model dtype (_keep_in_fp32_modules).
FLOAT32_PARAMS = ("norm.weight",)


@dataclasses.dataclass(kw_only=True)
class ModelArgs(TransformerArgs):
    num_local_experts: int = spec(minimum=1)
    num_experts_per_tok: int = spec(4, top_k_of="num_local_experts")
    rms_norm_eps: float = 1e-5
    sliding_window: int | None = spec(128, minimum=0)  # 0 or null: no window
    layer_types: list[str] | None = None
    attention_bias: bool = True
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0
    max_position_embeddings: int = 131072
    quantization_config: dict | None = None

    def __post_init__(self):
        super().__post_init__()
        if self.layer_types is None:  # the reference's default: sliding on even layers
            self.layer_types = [
                "sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(self.num_hidden_layers)
            ]
        if self.rope_parameters is None and self.rope_scaling is None:
            # transformers' GptOssConfig default: YaRN x32 over a 4096-token original context.
            self.rope_parameters = {
                "rope_type": "yarn",
                "factor": 32.0,
                "beta_fast": 32.0,
                "beta_slow": 1.0,
                "truncate": False,
                "original_max_position_embeddings": 4096,
            }
        self.mxfp4 = (self.quantization_config or {}).get("quant_method") == "mxfp4"


def moe_block(args: ModelArgs) -> SparseMoeBlock:
    # Top-k of the logits then softmax over those k: softmax over all, top-k, renormalised,
    # in the logits' dtype as the reference.
    router = Router(
        args.hidden_size,
        args.num_local_experts,
        args.num_experts_per_tok,
        linear_bias=True,
        renormalize=True,
        weights_dtype="logits",
    )
    act = ExpertActivation("swiglu_clamped", args.swiglu_alpha, args.swiglu_limit)
    experts = RoutedExperts(args.num_local_experts, args.hidden_size, args.intermediate_size, bias=True, act=act)
    return SparseMoeBlock(router, experts, names={"router": "router"})


class Norm(RMSNorm):
    """The reference scales before casting back (weight * x in float32), unlike Llama's."""

    scale_in_float32 = True


class Model(CausalLM):
    def __init__(self, args: ModelArgs):
        D, eps = args.hidden_size, args.rms_norm_eps
        rope = args.rotary(default_theta=150000.0)
        layers = []
        for kind in args.layer_types[: args.num_hidden_layers]:
            window = args.sliding_window if kind == "sliding_attention" else None
            layer = attention_layer(
                args,
                rope,
                moe_block(args),
                qkv_bias=args.attention_bias,
                o_bias=args.attention_bias,
                sinks=True,
                sliding_window=window,
            )
            layer.input_layernorm, layer.post_attention_layernorm = Norm(D, eps), Norm(D, eps)
            layers.append(layer)
        super().__init__(args, layers)
        self.model.norm = Norm(D, eps)


def _expert_weight(weights: dict, name: str) -> torch.Tensor | None:
    """`{name}` [E, in, out] as stored in bf16, or dequantized from `{name}_blocks`/`_scales`."""
    if name in weights:
        return weights.pop(name)
    if f"{name}_blocks" in weights:
        return mxfp4.dequantize(weights.pop(f"{name}_blocks"), weights.pop(f"{name}_scales"))
    return None


def sanitize(weights: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    """Checkpoint names -> ours: per layer, `mlp.experts.{gate_up_proj,down_proj}` (bf16, or
    MXFP4 blocks dequantized here) and their biases -> w13 [E, 2I, D] (gate rows, then up
    rows), w2 [E, D, I], b13 [E, 2I], b2 [E, D]. Already-converted names pass through."""
    weights = dict(weights)
    for i in range(args.num_hidden_layers):
        p = f"model.layers.{i}.mlp.experts"
        gate_up = _expert_weight(weights, f"{p}.gate_up_proj")  # [E, D, 2I], interleaved
        if gate_up is not None:
            weights[f"{p}.w13"] = (
                torch.cat([gate_up[..., ::2], gate_up[..., 1::2]], dim=-1).transpose(1, 2).contiguous()
            )
        down = _expert_weight(weights, f"{p}.down_proj")  # [E, I, D]
        if down is not None:
            weights[f"{p}.w2"] = down.transpose(1, 2).contiguous()
        bias = weights.pop(f"{p}.gate_up_proj_bias", None)  # [E, 2I], interleaved
        if bias is not None:
            weights[f"{p}.b13"] = torch.cat([bias[..., ::2], bias[..., 1::2]], dim=-1)
        if f"{p}.down_proj_bias" in weights:
            weights[f"{p}.b2"] = weights.pop(f"{p}.down_proj_bias")
    return weights


def checkpoint_tensors(args: ModelArgs) -> dict:
    """The released checkpoint's tensors: name -> (shape, stored dtype, role). Experts as
    MXFP4 (rows are output features: 32 values per block, two per byte, one U8 exponent
    per block) when the config says so, else bf16 [E, D, 2I] / [E, I, D]."""
    D, E, I, H = args.hidden_size, args.num_local_experts, args.intermediate_size, args.num_attention_heads
    t = CheckpointLayout.decoder(args)
    for i, p in t.layers():
        t.attention_layer(p, args.attention_bias, args.attention_bias)
        t.add(f"{p}.self_attn.sinks", (H,), "attention")
        t.linear(f"{p}.mlp.router", E, D, "routers", bias=True)
        m = f"{p}.mlp.experts"
        for proj, n_out, n_in in (("gate_up_proj", 2 * I, D), ("down_proj", D, I)):
            if args.mxfp4:
                t.add(f"{m}.{proj}_blocks", (E, n_out, n_in // mxfp4.BLOCK, mxfp4.BLOCK // 2), "routed_experts", "U8")
                t.add(f"{m}.{proj}_scales", (E, n_out, n_in // mxfp4.BLOCK), "routed_experts", "U8")
            else:
                t.add(f"{m}.{proj}", (E, n_in, n_out), "routed_experts")
            t.add(f"{m}.{proj}_bias", (E, n_out), "routed_experts")
    t.final()
    return t.tensors
