"""Encoded examples and the collators that pad them into batches.

Four batch formats, one per kind of training signal:

* ``sft``: ``input_ids``, ``attention_mask``, ``labels`` (batch, seq), ``pixel_values`` (n_images, 3, H, W).
* ``pairs``: a prompt with k ranked responses (k = 2: chosen, rejected) in one of two layouts:

  - ``plain``: k separate sequences per example, ``[prompt | response_i]`` (the test oracle, and what the
    common DPO tooling computes);
  - ``packed``: one sequence per example, ``[prompt | response_0 | response_1 | ...]``, where response i
    restarts its positions right after the prompt and a block mask (``packed_attention_mask``) lets each
    response see the prompt and itself, never the other responses. The prompt (with its ~576 image tokens at
    LLaVA-1.5 scale) is then computed once per example instead of k times.

  Both layouts give the same per-response log-probs; they share ``targets`` (R, T) and ``target_index`` (R, T),
  R = batch * k responses in example-major order: response r's token t is ``targets[r, t]`` (-100 = padding),
  predicted from the flattened hidden-state row ``target_index[r, t]`` of ``hidden.reshape(-1, hidden_size)``.
  ``last_index`` (R,) is the flattened row of each response's last token (where a reward model reads its score).
  ``image_index`` lists which image (row of ``pixel_values``) fills each run of image tokens, in order, so image
  features are computed once per example and repeated only where a layout repeats the prompt.
* ``unpaired``: KTO's examples, one response each with ``desirable`` (batch,) bool, laid out as a ``pairs``
  batch with k = 2: response 0 is the example's own completion, response 1 the completion of the previous example
  in the batch (rotated by one), a mismatched response for KTO's batch estimate of KL(pi || pi_ref).
* ``prompts``: left-padded prompts for generation, plus the records' metadata.

Every format carries ``ids`` (one per example), which ``batch_counts`` counts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from .chat import IGNORE


@dataclass
class SFTExample:
    ids: list[int]
    labels: list[int]
    pixel_values: torch.Tensor  # (n_images, 3, H, W)
    id: str = ""


@dataclass
class PairExample:
    prompt: list[int]
    responses: list[list[int]]  # k responses, best first
    pixel_values: torch.Tensor
    ref_logps: Optional[list[dict]] = None  # k x {"sum", "mean", "tokens"}
    id: str = ""


@dataclass
class UnpairedExample:
    prompt: list[int]
    completion: list[int]
    pixel_values: torch.Tensor
    desirable: bool
    room: int  # the longest response this prompt leaves under max_length (a borrowed completion is cut to it)
    id: str = ""


@dataclass
class PromptExample:
    prompt: list[int]
    pixel_values: torch.Tensor
    record: dict = field(default_factory=dict)  # id, prompt text, answer, objects, meta


def _pad(rows: list[list[int]], value: int, side: str = "right", length: Optional[int] = None) -> torch.Tensor:
    length = length or max(len(r) for r in rows)
    out = torch.full((len(rows), length), value, dtype=torch.long)
    for i, r in enumerate(rows):
        if side == "right":
            out[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        else:
            out[i, length - len(r):] = torch.tensor(r, dtype=torch.long)
    return out


def _images(examples) -> torch.Tensor:
    pv = [e.pixel_values for e in examples if e.pixel_values is not None and e.pixel_values.numel()]
    return torch.cat(pv) if pv else torch.zeros(0)


def collate_sft(examples: list[SFTExample], pad_id: int) -> dict[str, Any]:
    ids = _pad([e.ids for e in examples], pad_id)
    return {
        "input_ids": ids,
        "attention_mask": _pad([[1] * len(e.ids) for e in examples], 0),
        "labels": _pad([e.labels for e in examples], IGNORE),
        "pixel_values": _images(examples),
        "ids": [e.id for e in examples],
    }


def _ref_tensors(examples: list[PairExample]) -> dict[str, torch.Tensor]:
    if not all(e.ref_logps is not None for e in examples):
        return {}
    return {
        "ref_logps_sum": torch.tensor([[r["sum"] for r in e.ref_logps] for e in examples], dtype=torch.float32),
        "ref_logps_mean": torch.tensor([[r["mean"] for r in e.ref_logps] for e in examples], dtype=torch.float32),
    }


def collate_pairs(examples: list[PairExample], pad_id: int, layout: str = "packed",
                  padding_side: str = "right") -> dict[str, Any]:
    """Pad k-response examples into the ``plain`` or ``packed`` layout (see the module docstring)."""
    k = len(examples[0].responses)
    if any(len(e.responses) != k for e in examples):
        raise ValueError("every example in a batch needs the same number of responses")
    n_images = [e.pixel_values.shape[0] if e.pixel_values.numel() else 0 for e in examples]
    first_image = [sum(n_images[:b]) for b in range(len(examples))]
    resp_lens = [[len(r) for r in e.responses] for e in examples]
    targets = _pad([r for e in examples for r in e.responses], IGNORE)
    target_index = torch.zeros_like(targets)
    last_index = torch.zeros(targets.shape[0], dtype=torch.long)  # flat position of each response's last token
    batch: dict[str, Any] = {"layout": layout, "num_responses": k, "targets": targets,
                             "prompt_lengths": torch.tensor([len(e.prompt) for e in examples]),
                             "response_lengths": torch.tensor(resp_lens),
                             "pixel_values": _images(examples), "ids": [e.id for e in examples]}
    if layout == "plain":
        rows = [e.prompt + r for e in examples for r in e.responses]
        L = max(len(r) for r in rows)
        batch["input_ids"] = _pad(rows, pad_id, padding_side, L)
        batch["attention_mask"] = _pad([[1] * len(r) for r in rows], 0, padding_side, L)
        batch["position_ids"] = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
        image_index = []
        for b, e in enumerate(examples):
            for i, r in enumerate(e.responses):
                row = b * k + i
                shift = L - len(e.prompt) - len(r) if padding_side == "left" else 0
                P = len(e.prompt)
                target_index[row, :len(r)] = row * L + shift + P - 1 + torch.arange(len(r))
                last_index[row] = row * L + shift + P + len(r) - 1
                image_index += range(first_image[b], first_image[b] + n_images[b])
    elif layout == "packed":
        rows, segs, poss = [], [], []
        for b, e in enumerate(examples):
            P = len(e.prompt)
            row, seg, pos = list(e.prompt), [0] * P, list(range(P))
            for i, r in enumerate(e.responses):
                start = len(row)
                idx = [P - 1] + [start + t for t in range(len(r) - 1)]
                target_index[b * k + i, :len(r)] = torch.tensor(idx)
                last_index[b * k + i] = start + len(r) - 1
                row += r
                seg += [i + 1] * len(r)
                pos += range(P, P + len(r))
            rows.append(row)
            segs.append(seg)
            poss.append(pos)
        L = max(len(r) for r in rows)
        batch["input_ids"] = _pad(rows, pad_id, padding_side, L)
        batch["segment_ids"] = _pad(segs, -1, padding_side, L)
        batch["position_ids"] = _pad(poss, 0, padding_side, L)
        for b, row in enumerate(rows):
            shift = L - len(row) if padding_side == "left" else 0
            for i in range(k):
                r = b * k + i
                target_index[r, :resp_lens[b][i]] += b * L + shift
                last_index[r] += b * L + shift
        image_index = [i for b in range(len(examples)) for i in range(first_image[b], first_image[b] + n_images[b])]
        batch["attention_mask"] = batch["segment_ids"] >= 0
    else:
        raise ValueError(f"layout must be 'plain' or 'packed', got {layout!r}")
    target_index[targets == IGNORE] = 0
    batch["target_index"] = target_index
    batch["last_index"] = last_index
    batch["image_index"] = torch.tensor(image_index, dtype=torch.long)
    batch.update(_ref_tensors(examples))
    return batch


def collate_unpaired(examples: list[UnpairedExample], pad_id: int, layout: str = "packed",
                     padding_side: str = "right") -> dict[str, Any]:
    """KTO's batch: a ``pairs`` batch of [own completion, previous example's completion] per prompt, plus
    ``desirable`` (batch,) bool. With a batch of one the mismatched completion is its own (no KL signal)."""
    n = len(examples)
    pairs = [PairExample(e.prompt, [e.completion, examples[(i - 1) % n].completion[:e.room]], e.pixel_values,
                         id=e.id) for i, e in enumerate(examples)]
    batch = collate_pairs(pairs, pad_id, layout=layout, padding_side=padding_side)
    batch["desirable"] = torch.tensor([e.desirable for e in examples], dtype=torch.bool)
    return batch


def packed_attention_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """Boolean (batch, 1, L, L) mask for packed ``[prompt | r_0 | r_1 | ...]`` sequences; True = may attend.

    segment_ids: (batch, L) with 0 for the shared prompt, i + 1 for response i, -1 for padding. A query attends
    to keys at or before it (in packed order) that are in the prompt or in its own segment. Padding positions
    attend to themselves only, so no attention row is empty (an empty row gives NaN under SDPA).
    """
    L = segment_ids.shape[1]
    q, k = segment_ids[:, :, None], segment_ids[:, None, :]
    causal = torch.ones(L, L, dtype=torch.bool, device=segment_ids.device).tril()
    allowed = causal & (k >= 0) & (q >= 0) & ((k == 0) | (k == q))
    allowed |= torch.eye(L, dtype=torch.bool, device=segment_ids.device)
    return allowed[:, None]


def collate_prompts(examples: list[PromptExample], pad_id: int) -> dict[str, Any]:
    """Left-padded prompts (generation appends on the right)."""
    return {
        "input_ids": _pad([e.prompt for e in examples], pad_id, "left"),
        "attention_mask": _pad([[1] * len(e.prompt) for e in examples], 0, "left"),
        "pixel_values": _images(examples),
        "records": [e.record for e in examples],
        "ids": [e.record.get("id", "") for e in examples],
    }


def batch_counts(batch: dict) -> tuple[int, int, list[int]]:
    """(examples, non-pad tokens, tokens per row) of a batch of any format; a pair or ranked list is one example."""
    mask = batch.get("attention_mask")
    if mask is None:
        return len(batch.get("ids", ())), 0, []
    if mask.dim() != 2:
        mask = batch["segment_ids"] >= 0
    lengths = mask.sum(-1).tolist()
    return len(batch.get("ids", lengths)), int(sum(lengths)), lengths


def to_device(batch: dict, device) -> dict:
    """The batch with its tensors on ``device`` (lists and flags untouched)."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
