"""Router families against hand-written definitions."""

import torch

from moeray.config import tiny_model_config
from moeray.models.routing import route


def test_softmax_topk_renormalised():
    cfg = tiny_model_config(num_experts=6, top_k=2, norm_topk_prob=True)
    logits = torch.randn(5, 6)
    ids, w = route(logits, cfg)
    probs = torch.softmax(logits, -1)
    want_ids = probs.topk(2).indices
    assert torch.equal(ids, want_ids)
    want_w = probs.gather(1, want_ids)
    torch.testing.assert_close(w, want_w / want_w.sum(-1, keepdim=True))


def test_softmax_without_renormalisation_keeps_probabilities():
    cfg = tiny_model_config(num_experts=6, top_k=3, norm_topk_prob=False)
    logits = torch.randn(4, 6)
    ids, w = route(logits, cfg)
    torch.testing.assert_close(w, torch.softmax(logits, -1).gather(1, ids))


def test_sigmoid_group_limited_with_bias_and_scaling():
    cfg = tiny_model_config(num_experts=8, top_k=2, scoring="sigmoid", n_group=4, topk_group=1,
                            routed_scaling_factor=2.5, selection_bias=True)
    logits = torch.randn(16, 8)
    bias = torch.randn(8)
    ids, w = route(logits, cfg, bias)
    scores = torch.sigmoid(logits)
    biased = scores + bias
    for t in range(16):
        groups = biased[t].view(4, 2).sum(-1)  # top-2 of a 2-expert group is the whole group
        g = int(groups.argmax())
        assert set(ids[t].tolist()) == {2 * g, 2 * g + 1}, "both picks come from the best group"
        chosen = scores[t, ids[t]]
        torch.testing.assert_close(w[t], 2.5 * chosen / chosen.sum())


def test_bias_changes_selection_but_not_weights():
    cfg = tiny_model_config(num_experts=4, top_k=1, scoring="sigmoid", selection_bias=True, norm_topk_prob=False)
    logits = torch.tensor([[0.0, 1.0, 0.0, 0.0]])
    bias = torch.tensor([5.0, 0.0, 0.0, 0.0])
    ids, w = route(logits, cfg, bias)
    assert ids.item() == 0
    torch.testing.assert_close(w, torch.sigmoid(torch.tensor([[0.0]])))
