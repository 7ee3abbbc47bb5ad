"""MoE expert layers as grouped GEMMs: every expert's tokens in one matmul call per projection.

transformers' expert modules (`@use_experts_implementation`: Qwen3-VL-MoE's `Qwen3VLMoeTextExperts`, GLM-4.5V's
`Glm4vMoeTextExperts`) hold the experts as 3-D weights, (experts, 2 * intermediate, hidden) for gate+up and
(experts, hidden, intermediate) for down, and dispatch their forward by `config._experts_implementation`. Their
"eager" forward is a Python loop over the experts hit (one host sync and two small GEMMs per expert, ~100 launches
per layer for a 128-expert model at batch 64). transformers 5.17 and 5.25 already default to their own
"grouped_mm" (modeling_utils.get_correct_experts_implementation); this module registers ours beside it and the
loader selects it explicitly for the families whose `FamilySpec.experts` is "grouped", so the paged engine does not
depend on a default that silently falls back to the loop, and the two can be measured against each other
(bench/moe.py).

Only the experts are replaced: routing (softmax or sigmoid, grouped top-k, `norm_topk_prob`, scaling factors,
shared experts) stays the model's own code, which hands us `top_k_index` / `top_k_weights` per token.

What ours does differently from transformers' grouped_mm: group offsets by `searchsorted` (no histc, no host sync,
CUDA-graph safe), no expert-parallel sentinel masking (two full-size masked_fill passes per layer in 5.17), the
k contributions of a token summed in float32, and a sort + padded batched-matmul fallback (not a loop) where torch's
grouped matmul is unavailable.
"""

from __future__ import annotations

from typing import Any, Literal

import torch

from vlmserve.models import hf_compat

EXPERTS_NAME = "vlmserve_grouped_gemm"

GroupedMethod = Literal["grouped_mm", "padded_bmm"]


def _grouped_mm_fn() -> Any:
    return getattr(torch.nn.functional, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def grouped_method(weight: torch.Tensor) -> GroupedMethod:
    """torch's grouped matmul where it has a kernel for these weights, else the padded batched matmul.

    NOTE: float16/float32 weights on CUDA take the padded path, whose group length is read on the host (one sync
    per layer): decode steps then cannot be captured in CUDA graphs and run eagerly (the runner logs it). Only
    bf16 on the GPU and every dtype on the CPU have been run here."""
    if _grouped_mm_fn() is None:
        return "padded_bmm"
    if weight.device.type == "cuda":
        # the CUDA kernels are bf16 (SM80+); other dtypes take the padded path
        ok = weight.dtype == torch.bfloat16 and torch.cuda.get_device_capability(weight.device) >= (8, 0)
        return "grouped_mm" if ok else "padded_bmm"
    return "grouped_mm" if weight.device.type == "cpu" else "padded_bmm"


def expert_offsets(sorted_ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """End row of each expert's group in `sorted_ids` (int32, what grouped_mm takes); experts with no rows get an
    empty group. No host sync, so CUDA graphs can capture it."""
    experts = torch.arange(num_experts, device=sorted_ids.device, dtype=sorted_ids.dtype)
    return torch.searchsorted(sorted_ids, experts, right=True).to(torch.int32)


def grouped_matmul(rows: torch.Tensor, weight: torch.Tensor, sorted_ids: torch.Tensor, offsets: torch.Tensor,
                   method: GroupedMethod) -> torch.Tensor:
    """rows (S, in) sorted by expert, weight (experts, in, out) → (S, out): row i times weight[sorted_ids[i]]."""
    if method == "grouped_mm":
        return _grouped_mm_fn()(rows, weight, offs=offsets)
    # padded: scatter each group into a (experts, longest group, in) block, one bmm, gather back (one host sync)
    starts = torch.cat([offsets.new_zeros(1), offsets[:-1]]).long()
    slot = torch.arange(rows.shape[0], device=rows.device) - starts[sorted_ids]
    longest = int((offsets - torch.cat([offsets.new_zeros(1), offsets[:-1]])).max().item())
    padded = rows.new_zeros(weight.shape[0], max(longest, 1), rows.shape[1])
    padded[sorted_ids, slot] = rows
    return torch.bmm(padded, weight)[sorted_ids, slot]


def grouped_experts_forward(self: Any, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                            top_k_weights: torch.Tensor, method: GroupedMethod | None = None) -> torch.Tensor:
    """The experts of `self` (a transformers experts module) for hidden_states (tokens, hidden) routed to
    top_k_index / top_k_weights (tokens, k): sum over k of weight * down(gate(act) * up)."""
    tokens, top_k = top_k_index.shape
    sorted_ids, order = torch.sort(top_k_index.reshape(-1), stable=True)
    rows = hidden_states[order // top_k].to(self.gate_up_proj.dtype)
    offsets = expert_offsets(sorted_ids, self.num_experts)
    method = method or grouped_method(self.gate_up_proj)
    gate_up = grouped_matmul(rows, self.gate_up_proj.transpose(-2, -1), sorted_ids, offsets, method)
    inner = self._apply_gate(gate_up)
    down = grouped_matmul(inner, self.down_proj.transpose(-2, -1), sorted_ids, offsets, method)
    weighted = down.float() * top_k_weights.reshape(-1)[order].float().unsqueeze(-1)
    # back to (token, k) order by a scatter with unique indices (deterministic, unlike index_add_ on CUDA)
    unsorted = torch.empty_like(weighted)
    unsorted[order] = weighted
    return unsorted.view(tokens, top_k, -1).sum(dim=1).to(hidden_states.dtype)


def supported(module: torch.nn.Module) -> bool:
    """Experts we can run: gated, concatenated [gate; up], (experts, out, in) weights, no biases."""
    return (getattr(module, "has_gate", False) and getattr(module, "is_concatenated", False)
            and not getattr(module, "is_transposed", True) and not getattr(module, "has_bias", True)
            and not getattr(module, "has_post_expert_norm", False)
            and isinstance(getattr(module, "gate_up_proj", None), torch.Tensor)
            and isinstance(getattr(module, "down_proj", None), torch.Tensor))


def install_grouped_experts(model: torch.nn.Module) -> int:
    """Switch every expert module of `model` to the grouped GEMM forward; the number switched (0: none, or some
    layout we do not handle, in which case the model keeps transformers' choice)."""
    experts = hf_compat.experts_modules(model)
    if not experts or not all(supported(m) for m in experts):
        return 0
    hf_compat.register_experts(EXPERTS_NAME, grouped_experts_forward)
    hf_compat.use_experts(model, EXPERTS_NAME)
    return len(experts)
