"""Per-response log-probabilities of ``pairs`` batches (plain or packed layout; see ``data.collate``).

For response r with tokens y_1..y_n after prompt x (images included):

    logp_sum(r)  = sum_t log p(y_t | x, y_<t)          (batch, k)
    logp_mean(r) = logp_sum(r) / n                      (batch, k)   mllm-dpo's "use average", IPO
    tokens(r)    = n                                    (batch, k)

Only the hidden states at the positions that predict response tokens are projected onto the vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .data.collate import packed_attention_mask


@dataclass
class PairLogps:
    """Log-probs of the k responses of each example in a ``pairs`` batch (R = batch * k responses, T tokens).

    sum, mean, tokens: (batch, k), responses best first. token_logps, mask: (R, T), 0 / False at padding
    (``None`` for precomputed reference log-probs, which are stored per response only). logits: (n_target_tokens,
    vocab) in the row-major order of ``mask``, when asked for.
    """

    sum: torch.Tensor
    mean: torch.Tensor
    tokens: torch.Tensor
    token_logps: Optional[torch.Tensor] = None
    mask: Optional[torch.Tensor] = None
    logits: Optional[torch.Tensor] = None

    def get(self, reduction: str) -> torch.Tensor:
        """``sum`` or ``mean`` (batch, k)."""
        if reduction not in ("sum", "mean"):
            raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
        return self.sum if reduction == "sum" else self.mean


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
               keep_logits: bool = False) -> PairLogps:
    """Log-probs of every response in a ``pairs`` batch.

    image_features: precomputed ``pair_image_features`` (e.g. shared by the policy and a reference whose vision
    tower and projector are the same frozen modules); computed here when ``None``.
    keep_logits: also return the logits of the response tokens (SIMA's noisy scoring, PPO's entropy).
    """
    if image_features is None:
        image_features = pair_image_features(backbone, batch)
    hidden = pair_hidden(backbone, batch, image_features)
    flat = hidden.reshape(-1, hidden.shape[-1])
    targets = batch["targets"]
    h = flat[batch["target_index"]]  # (R, T, hidden)
    token_logps, logits = backbone.token_logps(h, targets, keep_logits=keep_logits)
    mask = targets != -100
    k = batch["num_responses"]
    tokens = mask.sum(-1)
    total = token_logps.sum(-1)
    return PairLogps(sum=total.view(-1, k), mean=(total / tokens.clamp(min=1)).view(-1, k), tokens=tokens.view(-1, k),
                     token_logps=token_logps, mask=mask, logits=logits)
