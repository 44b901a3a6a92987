"""Router rules. Each architecture picks its rule and parameters in its own file; this
module holds the math so that later kernels have one reference to match.

Shape legend: N tokens, E experts, K experts per token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moerun.kernels import cpu_glue


def routing_kernel_for(logits: torch.Tensor, kernel: bool | None = None) -> bool:
    """Use the Triton routing kernel? On CUDA when the kernels can run (kernel=None);
    kernel=True forces it (the CPU then needs TRITON_INTERPRET=1: tests)."""
    if kernel is not None:
        return kernel
    if logits.device.type != "cuda":
        return False
    from moerun import kernels

    return kernels.available(logits.device)


def softmax_topk(
    logits: torch.Tensor,
    k: int,
    renormalize: bool,
    weights_dtype: torch.dtype | None = None,
    kernel: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over all experts (in float32), keep the k largest, optionally renormalise
    them to sum to one. logits [N, E] -> (ids [N, K] int64, weights [N, K]).

    With renormalize=True this equals "top-k of the logits, then softmax over the k"
    (Mixtral's rule); without it the weights are the full-softmax probabilities
    (Qwen2-MoE, Qwen3-MoE with norm_topk_prob false). On CUDA one routing kernel does it
    all (moerun/kernels/routing.py), instead of four or five torch launches.
    """
    if routing_kernel_for(logits, kernel):
        from moerun import kernels

        ids, weights, _ = kernels.route(logits.contiguous(), k, kernel=True, scoring="softmax", renormalize=renormalize)
        return ids.long(), weights if weights_dtype is None else weights.to(weights_dtype)
    probs = torch.softmax(logits.float(), dim=-1)
    weights, ids = torch.topk(probs, k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    if weights_dtype is not None:
        weights = weights.to(weights_dtype)
    return ids, weights


class Router(nn.Module):
    """The one router every MoE family declares with its rule's parameters, holding the
    gate weight [E, D] (and biases) under the checkpoint's names. Called on flat tokens
    x [N, D] -> (ids [N, K] int64, weights [N, K]).

    scoring: "softmax" over all experts (in float32) or "sigmoid" per expert.
    renormalize: divide the k weights by their sum (Mixtral's "softmax over the top-k
    logits" is softmax + renormalize). scaling: multiply the weights (DeepSeek's
    routed_scaling_factor). linear_bias: a bias on the gate (gpt-oss). correction_bias:
    `e_score_correction_bias` [E], added to the scores for the choice only (DeepSeek-V3,
    GLM-4.5, ERNIE-4.5). n_group / topk_group with group_score "max" (DeepSeek-V2's best
    expert per group) or "top2_sum" (V3: the sum of the two best biased scores): only the
    experts of the topk_group best groups can be picked. float32_logits: the gate's matmul
    in float32 (DeepSeek); weights_dtype: "float32", "logits" (cast to the logits' dtype,
    as Qwen's reference does) or "input" (to the activations' dtype, ERNIE). renorm_eps:
    added to the sum when renormalizing (DeepSeek's 1e-20); renorm_min: the sum clamped
    below instead (ERNIE's norm_min). scores_in_logits_dtype: score, pick and renormalise in
    the logits' dtype instead of float32 (LFM2's reference takes the sigmoid of bf16 logits;
    in float32 models it changes nothing)."""

    role = "routers"

    def __init__(
        self,
        hidden_size: int,
        n_experts: int,
        top_k: int,
        *,
        scoring: str = "softmax",
        renormalize: bool = False,
        scaling: float = 1.0,
        linear_bias: bool = False,
        correction_bias: bool = False,
        n_group: int | None = None,
        topk_group: int | None = None,
        group_score: str = "max",
        float32_logits: bool = False,
        weights_dtype: str = "float32",
        renorm_eps: float = 0.0,
        renorm_min: float | None = None,
        scores_in_logits_dtype: bool = False,
    ):
        super().__init__()
        if scoring not in ("softmax", "sigmoid"):
            raise ValueError(f"scoring must be softmax or sigmoid, got {scoring!r}")
        self.n_experts, self.top_k = n_experts, top_k
        self.weight = nn.Parameter(torch.empty(n_experts, hidden_size))
        self.bias = nn.Parameter(torch.empty(n_experts)) if linear_bias else None
        self.e_score_correction_bias = nn.Parameter(torch.zeros(n_experts)) if correction_bias else None
        self.scoring, self.renormalize, self.scaling = scoring, renormalize, scaling
        self.n_group, self.topk_group, self.group_score = n_group or 1, topk_group or 1, group_score
        self.float32_logits, self.weights_dtype = float32_logits, weights_dtype
        self.renorm_eps, self.renorm_min = renorm_eps, renorm_min
        self.scores_in_logits_dtype = scores_in_logits_dtype

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """x [N, D] -> [N, E]"""
        if self.float32_logits:
            bias = None if self.bias is None else self.bias.float()
            return F.linear(x.float(), self.weight.float(), bias)
        return F.linear(x, self.weight, self.bias)

    def forward(self, x: torch.Tensor, kernel: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.logits(x)
        out_dtype = {"logits": logits.dtype, "input": x.dtype}.get(self.weights_dtype, torch.float32)
        if self._kernel_routes(logits, kernel):
            from moerun import kernels

            ids, weights, _ = kernels.route(
                logits.contiguous(),
                self.top_k,
                kernel=True,
                scoring=self.scoring,
                renormalize=self.renormalize,
                bias=self.e_score_correction_bias,
                n_group=self.n_group,
                topk_group=self.topk_group,
                scaling=self.scaling,
            )
            return ids.long(), weights.to(out_dtype)
        if self._glue_routes(logits, out_dtype):  # a CPU decode step: one C call
            routed = cpu_glue.route(
                logits,
                self.top_k,
                scoring=self.scoring,
                bias=self.e_score_correction_bias,
                n_group=self.n_group,
                topk_group=self.topk_group,
                group_score=self.group_score,
                renormalize=self.renormalize,
                renorm_eps=self.renorm_eps,
                renorm_min=self.renorm_min,
                scaling=self.scaling,
                out_dtype=out_dtype,
            )
            if routed is not None:
                return routed
        f = logits if self.scores_in_logits_dtype else logits.float()
        scores = torch.softmax(f, dim=-1) if self.scoring == "softmax" else f.sigmoid()  # [N, E]
        choice = scores if self.e_score_correction_bias is None else scores + self.e_score_correction_bias.float()
        if self.n_group > 1:
            G = self.n_group
            groups = choice.view(-1, G, self.n_experts // G)  # [N, G, E/G]
            if self.group_score == "max":
                group_scores = groups.max(dim=-1).values
            else:
                group_scores = groups.topk(2, dim=-1)[0].sum(dim=-1)
            chosen = torch.topk(group_scores, k=self.topk_group, dim=-1, sorted=False)[1]
            keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, chosen, True)
            # V2 zeroes the other groups' scores (softmax scores are positive), V3 sets -inf.
            fill = 0.0 if self.group_score == "max" else float("-inf")
            choice = choice.masked_fill(~keep[:, :, None].expand_as(groups).reshape(choice.shape), fill)
        if self.e_score_correction_bias is None:
            weights, ids = torch.topk(choice, self.top_k, dim=-1)
        else:
            ids = torch.topk(choice, self.top_k, dim=-1)[1]
            weights = scores.gather(1, ids)  # the unbiased scores
        # Even one pick is renormalised (to 1; p / max(p, min) with ERNIE's clamp), as the
        # references and the kernel do; DeepSeek-V2, which skips it, passes renormalize=False.
        if self.renormalize:
            total = weights.sum(dim=-1, keepdim=True)
            total = total.clamp(min=self.renorm_min) if self.renorm_min is not None else total + self.renorm_eps
            weights = weights / total
        if self.scaling != 1.0:
            weights = weights * self.scaling
        return ids, weights.to(out_dtype)

    def _glue_routes(self, logits: torch.Tensor, out_dtype: torch.dtype) -> bool:
        """The C routing of a few CPU tokens (moerun/kernels/cpu_glue.py), for every rule but
        scores in bf16 (it scores in float32) and groups torch would refuse."""
        if self.scores_in_logits_dtype and logits.dtype != torch.float32:
            return False
        G, E = self.n_group, self.n_experts
        if G > 1 and (E % G or self.topk_group > G or (self.group_score == "top2_sum" and E // G < 2)):
            return False
        return cpu_glue.route_usable(logits, self.e_score_correction_bias, out_dtype)

    def _kernel_routes(self, logits: torch.Tensor, kernel: bool | None) -> bool:
        """The Triton routing kernel, on CUDA, for the rules it implements: softmax or
        sigmoid, renormalise, correction bias, sum-of-two group scores over power-of-two
        groups of >= 2 experts that can hold the k picks. Others route in torch."""
        if not routing_kernel_for(logits, kernel) or self.renorm_min is not None:
            return False
        if self.scores_in_logits_dtype and logits.dtype != torch.float32:
            return False  # the kernel scores in float32
        G, E = self.n_group, self.n_experts
        if G > 1 and (
            self.group_score != "top2_sum"
            or G & (G - 1)
            or E % G
            or E // G < 2
            or self.top_k > self.topk_group * (E // G)
        ):
            return False
        return self.renorm_eps in (0.0, 1e-20)
