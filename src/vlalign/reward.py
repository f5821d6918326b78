"""Reward model: the LLaVA backbone plus a scalar value head read at each response's last token.

    python src/train.py fit --config conf/reward.yaml

For a prompt x with responses ranked best first, y_0 > y_1 > ... > y_{k-1}:

    r_i = w^T h_last(x, y_i)                       (batch, k)     w: (hidden,), no bias (Vision-LLM-Alignment)
    L   = -sum_{i<k-1} log( exp(r_i) / sum_{j>=i} exp(r_j) )      Plackett-Luce; Bradley-Terry when k = 2

Pairs are scored with the same packed layout as DPO (the prompt and image once per pair): the last token of a
response only attends to the prompt and its own response, so its hidden state equals the plain computation's.
``export_dir`` receives the merged backbone (``merged/``) with ``value_head.safetensors`` and ``reward.json``
beside it; ``RewardScorer.load(export_dir)`` scores (image, prompt, response) triples with it.
"""

from __future__ import annotations

import json
import os
from typing import Optional, Sequence

import torch
from torch import nn

from .backbone import Backbone, BackboneConfig
from .checkpoint import atomic_file
from .logps import pair_hidden, pair_image_features
from .losses import RANKING_LOSSES
from .module import CONFIG_KEY, AlignModule, require
from .optim import OptimConfig
from .zero import gathered


def value_head(hidden_size: int, seed: int = 0) -> nn.Linear:
    """A bias-free linear head, initialised small (std 1 / sqrt(hidden + 1)) so initial rewards are near zero.

    The initialisation draws from its own generator seeded with ``seed``: the same head whatever ran before it
    (plain, DDP or ZeRO-3, where it is created inside ``deepspeed.zero.Init`` and initialised gathered).
    """
    head = nn.Linear(hidden_size, 1, bias=False)
    generator = torch.Generator().manual_seed(seed)
    with gathered(head.parameters()), torch.no_grad():
        # drawn on the CPU (its generator's device) whatever device context builds the model, then moved
        w = torch.randn(head.weight.shape, generator=generator, device="cpu") / (hidden_size + 1) ** 0.5
        head.weight.copy_(w.to(head.weight.dtype))
    return head


def load_head(path: str) -> nn.Linear:
    """The value head saved by ``save_head`` (works inside ``deepspeed.zero.Init``)."""
    from safetensors.torch import load_file

    w = load_file(path)["weight"]
    head = nn.Linear(w.shape[1], 1, bias=False)
    with gathered(head.parameters()), torch.no_grad():
        head.weight.copy_(w.to(head.weight.dtype))
    return head


def pair_rewards(backbone: Backbone, head: nn.Module, batch: dict, image_features=None) -> torch.Tensor:
    """Scalar rewards of every response in a ``pairs`` batch: (batch, k)."""
    if image_features is None:
        image_features = pair_image_features(backbone, batch)
    hidden = pair_hidden(backbone, batch, image_features)
    last = hidden.reshape(-1, hidden.shape[-1])[batch["last_index"]]
    return head(last.to(head.weight.dtype)).squeeze(-1).float().view(-1, batch["num_responses"])


class RewardModule(AlignModule):
    """Trains a reward model on preference pairs or ranked lists.

    Args:
        backbone: the LLaVA under the head (usually the SFT model; LoRA or full fine-tuning).
        optim: optimizer and schedule (``head_lr`` sets the value head's learning rate).
        loss: ``bradley_terry`` (pairs) or ``plackett_luce`` (k ranked candidates).
        num_responses: 2 for chosen/rejected; k > 2 uses the first k ranked candidates.
        layout: ``packed`` (prompt once per example) or ``plain``.
        head_seed: seed of the value head's initialisation (its own generator: the same head under any strategy).
        export_dir: export the reward model there at the end of ``fit`` (``merged/``, ``value_head.safetensors``,
            ``reward.json``).
    """

    def __init__(self, backbone: BackboneConfig = BackboneConfig(), optim: OptimConfig = OptimConfig(lr=1e-4),
                 loss: str = "bradley_terry", num_responses: int = 2, layout: str = "packed",
                 head_seed: int = 0, export_dir: Optional[str] = None):
        require(loss in RANKING_LOSSES, "loss", " | ".join(sorted(RANKING_LOSSES)), loss)
        require(isinstance(num_responses, int) and num_responses >= 2, "num_responses", "an integer >= 2",
                num_responses)
        if loss == "bradley_terry" and num_responses != 2:
            raise ValueError(f"{CONFIG_KEY}.num_responses: bradley_terry compares pairs: use num_responses 2, or "
                             "loss plackett_luce")
        require(layout in ("packed", "plain"), "layout", "packed | plain", layout)
        super().__init__(backbone, optim, export_dir)
        self.loss_fn, self.num_responses, self.layout = RANKING_LOSSES[loss], num_responses, layout
        self.head_seed = head_seed
        self.head: Optional[nn.Linear] = None

    def batch_spec(self) -> dict:
        return {"format": "pairs", "layout": self.layout, "num_responses": self.num_responses}

    def build(self, deepspeed_config):
        self.head = value_head(self.backbone.model.config.text_config.hidden_size, self.head_seed)

    def trainable(self):
        yield from self.backbone.named_trainable()
        yield from (("head", n, p) for n, p in self.head.named_parameters())

    def step(self, batch):
        rewards = pair_rewards(self.backbone, self.head, batch)  # (batch, k)
        loss = self.loss_fn(rewards).mean()
        chosen, rejected = rewards[:, 0], rewards[:, 1:]
        correct = (chosen[:, None] > rejected).all(-1).float()  # the best ranked above every other
        return loss, {"accuracy": correct.mean(), "margin": (chosen - rejected[:, -1]).mean(),
                      "reward_mean": rewards.mean(), "reward_std": rewards.std(unbiased=False)}

    def export(self, export_dir: str):
        super().export(export_dir)
        with gathered(self.head.parameters(), modify=False):  # collective under ZeRO-3: every rank enters
            if self.trainer.global_rank == 0:
                save_head(self.head, export_dir, self.backbone)


def save_head(head: nn.Linear, export_dir: str, backbone: Backbone):
    from safetensors.torch import save_file

    weight = head.weight.detach().float().cpu().contiguous()
    if not bool(torch.isfinite(weight).all()):
        raise ValueError("refusing to export the reward model: its value head holds NaN or inf")
    with atomic_file(os.path.join(export_dir, "value_head.safetensors")) as tmp:
        save_file({"weight": weight}, tmp)
    with atomic_file(os.path.join(export_dir, "reward.json")) as tmp, open(tmp, "w") as f:
        json.dump({"backbone": "merged", "hidden_size": head.in_features, "read_at": "last_token"}, f, indent=1)


class RewardScorer(nn.Module):
    """A trained reward model, loaded from a ``RewardModule`` export, that scores (image, prompt, response) triples.

    ``RewardScorer.load(path)`` rebuilds the merged backbone and its value head; ``score(images, prompts,
    responses)`` returns one float per triple; ``score_batch(batch)`` scores a ``pairs`` batch, (batch, k).
    """

    def __init__(self, backbone: Backbone, head: nn.Linear):
        super().__init__()
        self.backbone, self.head = backbone, head
        self.requires_grad_(False)
        self.eval()

    @classmethod
    def load(cls, path: str, dtype: str = "float32", deepspeed_config: Optional[dict] = None) -> "RewardScorer":
        """deepspeed_config: the ZeRO-3 config when loading inside a ZeRO-3 run (``deepspeed_config_of``)."""
        if not os.path.exists(os.path.join(path, "value_head.safetensors")):
            raise FileNotFoundError(f"{path} has no value_head.safetensors: is it a RewardModule export_dir?")
        bb = Backbone(BackboneConfig(checkpoint=os.path.join(path, "merged"), train_vision=False,
                                     train_projector=False, train_language=False, dtype=dtype)).build(deepspeed_config)
        return cls(bb, load_head(os.path.join(path, "value_head.safetensors")))

    def train(self, mode: bool = True):
        return super().train(False)  # always in eval mode: a frozen judge

    @torch.no_grad()
    def score_batch(self, batch: dict) -> torch.Tensor:
        return pair_rewards(self.backbone, self.head, batch)

    @torch.no_grad()
    def score(self, images: Sequence, prompts: Sequence[str], responses: Sequence[str], batch_size: int = 16) -> list[float]:
        """One reward per (image or None, prompt text, response text)."""
        from .data.chat import Encoder
        from .data.collate import PairExample, collate_pairs, to_device
        from .data.schema import with_images

        bb = self.backbone
        enc = Encoder(bb.tokenizer, bb.processor.chat_template, bb.num_image_tokens)
        out: list[float] = []
        device = next(self.parameters()).device
        for i in range(0, len(prompts), batch_size):
            examples = []
            for im, p, r in zip(images[i:i + batch_size], prompts[i:i + batch_size], responses[i:i + batch_size]):
                ims = [] if im is None else [im]
                turns = with_images([{"role": "user", "content": p}], len(ims))
                pv = bb.processor.image_processor(ims, return_tensors="pt")["pixel_values"] if ims else torch.zeros(0)
                examples.append(PairExample(enc.prompt(turns), [enc.response(turns, r)], pv))
            batch = to_device(collate_pairs(examples, bb.tokenizer.pad_token_id, layout="plain"), device)
            out += self.score_batch(batch)[:, 0].tolist()
        return out
