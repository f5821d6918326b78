"""Per-response log-probabilities of ``pairs`` batches (plain or packed layout; see ``data.collate``).

For response r with tokens y_1..y_n after prompt x (images included):

    logp_sum(r)  = sum_t log p(y_t | x, y_<t)          (batch, k)
    logp_mean(r) = logp_sum(r) / n                      (batch, k)   mllm-dpo's "use average", IPO
    tokens(r)    = n                                    (batch, k)

Only the hidden states at the positions that predict response tokens are projected onto the vocabulary.
"""

from __future__ import annotations

from typing import Optional

import torch

from .data.collate import packed_attention_mask


def pair_image_features(backbone, batch: dict) -> Optional[torch.Tensor]:
    """Projected features of the batch's images, one row per image (n_images, image_tokens, hidden)."""
    pv = batch["pixel_values"]
    if pv is None or not pv.numel():
        return None
    return backbone.encode_images(pv)


def pair_hidden(backbone, batch: dict, image_features: Optional[torch.Tensor]) -> torch.Tensor:
    """Hidden states of the batch's sequences: (rows, seq, hidden); rows = batch * k (plain) or batch (packed)."""
    feats = None if image_features is None else image_features[batch["image_index"]]
    if batch["layout"] == "packed":
        mask = packed_attention_mask(batch["segment_ids"])
    else:
        mask = batch["attention_mask"]
    return backbone.hidden_states(batch["input_ids"], mask, position_ids=batch["position_ids"], image_features=feats)


def pair_logps(backbone, batch: dict, image_features: Optional[torch.Tensor] = None,
               return_logits: bool = False) -> dict[str, torch.Tensor]:
    """Log-probs of every response in a ``pairs`` batch.

    image_features: precomputed ``pair_image_features`` (e.g. shared by the policy and a reference whose vision
    tower and projector are the same frozen modules); computed here when ``None``.
    Returns ``sum``, ``mean``, ``tokens`` (batch, k), ``token_logps`` (batch * k, T) and ``mask`` (batch * k, T);
    with ``return_logits`` also ``logits`` (n_target_tokens, vocab) in row-major order of ``mask``.
    """
    if image_features is None:
        image_features = pair_image_features(backbone, batch)
    hidden = pair_hidden(backbone, batch, image_features)
    flat = hidden.reshape(-1, hidden.shape[-1])
    targets = batch["targets"]
    h = flat[batch["target_index"]]  # (R, T, hidden)
    out = backbone.token_logps(h, targets, return_logits=return_logits)
    token_logps, logits = out if return_logits else (out, None)
    mask = targets != -100
    k = batch["num_responses"]
    tokens = mask.sum(-1)
    total = token_logps.sum(-1)
    result = {"sum": total.view(-1, k), "mean": (total / tokens.clamp(min=1)).view(-1, k),
              "tokens": tokens.view(-1, k), "token_logps": token_logps, "mask": mask}
    if return_logits:
        result["logits"] = logits
    return result
