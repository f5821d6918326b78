"""Sampling responses to a batch of prompts, for the online algorithms (PPO; group sampling for GRPO/RLOO).

    responses = sample_responses(policy, prompts_batch, Sampling(do_sample=True, max_new_tokens=64))
    responses.batch      # a k = 1 ``pairs`` batch (plain layout) of [prompt | response]: score it, take log-probs
    responses.examples   # the R (prompt, response) examples, to re-collate minibatches from

Generation uses the KV cache from left-padded prompts (``Backbone.generate``), keeps ZeRO-3 ranks in step, never
emits ``<image>``, and cuts each response after its first EOS.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .backbone import Backbone
from .data.collate import PairExample, collate_pairs, to_device
from .generation import Sampling


@dataclass
class Responses:
    """R sampled responses: ``examples`` (R) and their ``batch`` (a k = 1 ``pairs`` batch on the prompts' device)."""

    examples: list[PairExample]
    batch: dict
    pad_id: int

    def __len__(self) -> int:
        return len(self.examples)

    def minibatch(self, rows: list[int]) -> dict:
        """A ``pairs`` batch of the responses ``rows`` (plain layout, on the same device)."""
        device = self.batch["targets"].device
        return to_device(collate_pairs([self.examples[i] for i in rows], self.pad_id, layout="plain"), device)


@torch.no_grad()
def sample_responses(policy: Backbone, prompts: dict, sampling: Sampling) -> Responses:
    """One response per prompt of a ``prompts`` batch: input_ids / attention_mask (batch, seq) left-padded,
    pixel_values (n_images, 3, H, W). A sampled ``<image>`` ends its response (it would need image features)."""
    new = policy.generate(prompts["input_ids"], prompts["attention_mask"], prompts["pixel_values"],
                          max_new_tokens=sampling.max_new_tokens, do_sample=sampling.do_sample,
                          temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k)
    eos, per_image, pad = policy.tokenizer.eos_token_id, policy.num_image_tokens, policy.tokenizer.pad_token_id
    examples, first = [], 0
    for ids, mask, out in zip(prompts["input_ids"], prompts["attention_mask"], new.tolist()):
        prompt = ids[mask.bool()]
        n_img = int((prompt == policy.image_token_id).sum()) // per_image
        response = out[:out.index(eos) + 1] if eos in out else out
        if policy.image_token_id in response:
            response = response[:response.index(policy.image_token_id)] or [eos]
        examples.append(PairExample(prompt.tolist(), [response], prompts["pixel_values"][first:first + n_img]))
        first += n_img
    batch = to_device(collate_pairs(examples, pad, layout="plain"), prompts["input_ids"].device)
    return Responses(examples, batch, pad)
