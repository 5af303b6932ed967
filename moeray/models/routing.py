"""Router math for the MoE families we serve. Pure tensor functions; no distributed code.

Legend: T tokens, D hidden, E experts, K top-k, G expert groups.
"""

from __future__ import annotations

import torch

from moeray.config import ModelConfig


def route(
    logits_TE: torch.Tensor,
    cfg: ModelConfig,
    selection_bias_E: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Router logits -> (topk_ids_TK int64, topk_weights_TK float32).

    softmax family (Mixtral, Qwen-MoE, OLMoE): weights are the top-k softmax probabilities,
    renormalised to sum to 1 when `norm_topk_prob`.
    sigmoid family (DeepSeek-V3): selection uses sigmoid(logits) + bias, limited to the best
    `topk_group` of `n_group` groups (a group scores the sum of its top-2 members); weights are the
    unbiased sigmoid scores of the selected experts, renormalised when `norm_topk_prob`.
    Both families multiply by `routed_scaling_factor`.
    """
    logits_TE = logits_TE.float()
    if cfg.scoring == "softmax":
        scores_TE = torch.softmax(logits_TE, dim=-1)
    else:
        scores_TE = torch.sigmoid(logits_TE)

    select_TE = scores_TE
    if selection_bias_E is not None:
        select_TE = scores_TE + selection_bias_E.float()

    if cfg.n_group > 1:
        select_TE = _mask_to_top_groups(select_TE, cfg)

    topk_ids_TK = torch.topk(select_TE, cfg.top_k, dim=-1, sorted=True).indices
    topk_weights_TK = scores_TE.gather(1, topk_ids_TK)
    if cfg.norm_topk_prob:
        # Also for top_k = 1 (the weight becomes 1.0), as transformers does. DeepSeek-V3 adds 1e-20 to
        # the denominator; the other families divide by the plain sum (never 0 for softmax scores).
        denominator_T1 = topk_weights_TK.sum(dim=-1, keepdim=True)
        if cfg.scoring == "sigmoid":
            denominator_T1 = denominator_T1 + 1e-20
        topk_weights_TK = topk_weights_TK / denominator_T1
    topk_weights_TK = topk_weights_TK * cfg.routed_scaling_factor
    return topk_ids_TK, topk_weights_TK


def _mask_to_top_groups(select_TE: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """Keep only the experts of the `topk_group` best groups; others get -inf so top-k skips them."""
    num_tokens = select_TE.shape[0]
    per_group = cfg.num_experts // cfg.n_group
    select_TGX = select_TE.view(num_tokens, cfg.n_group, per_group)
    if cfg.scoring == "sigmoid":
        # DeepSeek-V3: a group scores the sum of its best two (biased) members.
        group_score_TG = select_TGX.topk(min(2, per_group), dim=-1).values.sum(dim=-1)
    else:
        group_score_TG = select_TGX.amax(dim=-1)
    top_groups_TG = torch.topk(group_score_TG, cfg.topk_group, dim=-1).indices
    keep_TG = torch.zeros_like(group_score_TG, dtype=torch.bool).scatter_(1, top_groups_TG, True)
    keep_TE = keep_TG.unsqueeze(-1).expand(-1, -1, per_group).reshape(num_tokens, cfg.num_experts)
    return select_TE.masked_fill(~keep_TE, float("-inf"))
