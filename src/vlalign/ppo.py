"""PPO (RLHF) of a LLaVA policy against a trained reward model, with a critic started from that reward model.

    python src/train.py fit --config conf/ppo.yaml                        # embedded default, CPU, minutes
    python src/train.py fit --config conf/recipes/vla_ppo_llava15_7b.yaml # LLaVA-1.5-7B, 8 GPUs, DeepSpeed

Follows Vision-LLM-Alignment's PPO (actor, critic, reference and reward model co-located). Each training step
takes a batch of prompts (image + question) and:

1. **Rollout** (no gradients, eval mode): sample a response y ~ pi(. | x) per prompt (top-k 50, top-p 0.95,
   temperature 0.75), cut after its first EOS; score it with the frozen reward model, s = r_phi(x, y) (read at the
   last token); compute the old log-probs log pi_old(y_t), the reference's log pi_ref(y_t) and the critic's values
   V(s_t) at the positions that predict each response token. All four are (R, T): R responses, T tokens.
2. **Reward**: s is z-normalised over a running window of the most recent scores (1000), scaled (x10) and clipped
   (+-10): s' = clip(scale * (s - mean_w) / std_w, -c, c). Per token, with a KL penalty to the reference:

       r_t = -kl_coef * (log pi_old(y_t) - log pi_ref(y_t))  +  [t = last] * s'          (R, T)

3. **GAE** (Schulman et al. 2016, arXiv 1506.02438), V(s_{T}) = 0 past each response's end:

       delta_t = r_t + gamma * V(s_{t+1}) - V(s_t),   A_t = sum_l (gamma * lam)^l delta_{t+l},   G_t = A_t + V(s_t)

   and the advantages are whitened over the response tokens of the batch.
4. **Update** (Schulman et al. 2017, arXiv 1707.06347): ``ppo_epochs`` passes over shuffled minibatches, each
   one optimizer step on

       L = -mean_t min(rho_t A_t, clip(rho_t, 1 - eps, 1 + eps) A_t)                      rho_t = pi / pi_old
         + vf_coef * 0.5 * mean_t max((V - G)^2, (V_old + clip(V - V_old, -eps_v, eps_v) - G)^2)

   (means over the minibatch's response tokens). During the first ``critic_warmup_steps`` rollouts only the
   critic term trains.

Where this differs from the seed: the critic's value head starts from the reward model's head (the seed started
it at zero, a known bug), and the reward model, critic and reference need not be separate DeepSpeed engines:
everything that trains sits in one optimizer (one parameter group per part; the critic's at ``critic_lr``).
``trainer.max_steps`` counts optimizer steps: rollouts x ppo_epochs x minibatches per rollout.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import replace
from typing import Optional

import lightning as L
import torch
from torch import nn

from .backbone import Backbone, BackboneConfig, LoraSpec, deepspeed_config_of
from .checkpoint import export_backbone, keep_trainable
from .data.collate import PairExample, collate_pairs
from .dpo import _frozen_copy_of
from .logps import pair_hidden, pair_image_features, pair_logps
from .losses import (entropy_from_logits, gae, masked_mean, masked_var, masked_whiten, normalize_score,
                     ppo_policy_loss, ppo_value_loss, token_rewards)
from .optim import OptimConfig, build_optimizer
from .reward import RewardScorer, load_head, pair_rewards


@contextlib.contextmanager
def eval_mode(*modules: nn.Module):
    """Run with dropout off, restoring each module's training flag afterwards."""
    flags = [m.training for m in modules]
    for m in modules:
        m.eval()
    try:
        yield
    finally:
        for m, flag in zip(modules, flags):
            m.train(flag)


def critic_values(critic: Backbone, head: nn.Module, batch: dict) -> torch.Tensor:
    """V(s_t) at every position that predicts a response token of a ``pairs`` batch: (R, T), 0 at padding."""
    hidden = pair_hidden(critic, batch, pair_image_features(critic, batch))
    h = hidden.reshape(-1, hidden.shape[-1])[batch["target_index"]]  # (R, T, hidden)
    values = head(h.to(head.weight.dtype)).squeeze(-1).float()
    return values * (batch["targets"] != -100)


class PPOModule(L.LightningModule):
    """PPO with a KL penalty to a reference, on ``prompts`` batches (see the module docstring).

    Args:
        backbone: the policy (usually the SFT model with LoRA).
        reward_model: a ``RewardModule`` export directory (``merged/`` + ``value_head.safetensors``); frozen.
        optim: optimizer and schedule of the policy (one AdamW for everything; ``trainer.max_steps`` counts its
            steps).
        critic_lr: learning rate of the critic (its LoRA or language model, and its value head); default
            ``optim.head_lr`` or ``optim.lr``. Vision-LLM-Alignment: actor 1e-5, critic 2e-5.
        critic_lora: LoRA of the critic, a copy of the reward model's backbone; ``r: 0`` trains its whole language
            model (the seed's choice).
        reference: ``adapter`` (the policy with LoRA disabled; no extra weights) or ``copy`` (a frozen copy of the
            policy's source, for full fine-tuning).
        max_new_tokens: longest sampled response (Vision-LLM-Alignment: 512; the shapes world needs ~24).
        temperature: sampling temperature of the rollouts (0.75).
        top_k: top-k sampling of the rollouts (50).
        top_p: nucleus sampling of the rollouts (0.95).
        kl_coef: weight of the per-token KL penalty to the reference (0.1).
        kl_estimator: per-token KL estimator: ``k1`` (log pi - log pi_ref, the seed's), ``k2`` or ``k3``.
        gamma: GAE discount (0.99).
        lam: GAE lambda (0.95).
        ppo_epochs: passes over each rollout batch (2).
        minibatch_size: responses per optimizer step; ``None``: the whole rollout batch (the seed's).
        policy_clip: epsilon of the clipped policy ratio (0.2).
        value_clip: epsilon of the clipped value update (0.2).
        vf_coef: weight of the value loss.
        max_grad_norm: gradient clipping by global norm (``None``: none). The trainer's ``gradient_clip_val``
            must stay unset: this module optimises manually.
        reward_window: how many of the most recent reward-model scores the normalisation's mean and std use (1000).
        reward_scale: factor applied to the z-normalised score (10; the embedded default may choose less).
        reward_clip: clip of the scaled score to [-reward_clip, reward_clip] (10); ``None``: no clipping.
        critic_warmup_steps: rollouts at the start during which only the critic trains (the seed: 30).
        sample_every: every this many rollouts, log a few (prompt, response, reward) as text to TensorBoard
            (0: never).
        num_samples: how many samples to log.
        export_dir: export the trained policy there at the end of ``fit`` (``merged/`` and ``adapter/``).
    """

    def __init__(self, backbone: BackboneConfig = BackboneConfig(), reward_model: str = "runs/reward/export",
                 optim: OptimConfig = OptimConfig(lr=1e-5), critic_lr: Optional[float] = None,
                 critic_lora: LoraSpec = LoraSpec(r=16, alpha=32.0, dropout=0.0), reference: str = "adapter",
                 max_new_tokens: int = 512, temperature: float = 0.75, top_k: int = 50, top_p: float = 0.95,
                 kl_coef: float = 0.1, kl_estimator: str = "k1", gamma: float = 0.99, lam: float = 0.95,
                 ppo_epochs: int = 2, minibatch_size: Optional[int] = None, policy_clip: float = 0.2,
                 value_clip: float = 0.2, vf_coef: float = 1.0, max_grad_norm: Optional[float] = 1.0,
                 reward_window: int = 1000, reward_scale: float = 10.0, reward_clip: Optional[float] = 10.0,
                 critic_warmup_steps: int = 0, sample_every: int = 50, num_samples: int = 4,
                 export_dir: Optional[str] = None):
        super().__init__()
        self.save_hyperparameters()
        self.automatic_optimization = False
        if reference not in ("adapter", "copy"):
            raise ValueError(f"reference must be 'adapter' or 'copy', got {reference!r}")
        if reference == "adapter" and backbone.lora.r == 0 and backbone.adapter is None:
            raise ValueError("reference 'adapter' needs LoRA on the policy (backbone.lora.r > 0); use 'copy' for "
                             "full fine-tuning")
        if not os.path.isfile(os.path.join(reward_model, "value_head.safetensors")):
            raise FileNotFoundError(f"reward_model {reward_model!r} is not a RewardModule export directory (merged/ and "
                                    "value_head.safetensors): train one first, e.g. with conf/reward.yaml")
        self.optim, self.critic_lr, self.export_dir = optim, critic_lr, export_dir
        self.backbone = Backbone(backbone)
        self.ref_backbone = Backbone(_frozen_copy_of(backbone)) if reference == "copy" else None
        self.critic = Backbone(BackboneConfig(
            checkpoint=os.path.join(reward_model, "merged"), lora=critic_lora, train_vision=False,
            train_projector=False, train_language=True, gradient_checkpointing=backbone.gradient_checkpointing,
            attn_implementation=backbone.attn_implementation, dtype=backbone.dtype))
        self.reward: Optional[RewardScorer] = None
        self.critic_head: Optional[nn.Linear] = None
        self.scores: list[float] = []  # the running window of raw reward-model scores
        self.rollouts = 0
        self.strict_loading = False  # checkpoints hold the trainable weights only

    # ------------------------------------------------------------------------------------------------- setup
    def batch_spec(self) -> dict:
        return {"format": "prompts"}

    def setup(self, stage: str):
        config = getattr(self.trainer.strategy, "config", None)
        if isinstance(config, dict) and self.hparams.max_grad_norm:
            config.setdefault("gradient_clipping", self.hparams.max_grad_norm)  # DeepSpeed clips inside its step

    def configure_model(self):
        ds = deepspeed_config_of(self._trainer)
        self.backbone.build(ds)
        self.critic.build(ds)
        if self.ref_backbone is not None:
            self.ref_backbone.build(ds).requires_grad_(False)
        if self.reward is None:
            self.reward = RewardScorer.load(self.hparams.reward_model, dtype=self.backbone.config.dtype,
                                            deepspeed_config=ds)
            self.critic_head = load_head(os.path.join(self.hparams.reward_model, "value_head.safetensors"))
            # V starts as the reward model: critic backbone = the reward model's, critic head = its value head
        check_same_tokenizer(self.backbone, self.reward.backbone)
        self.train(self.training)

    def configure_optimizers(self):
        critic = [("head", n, p) for _, n, p in self.critic.named_trainable()]
        critic += [("head", n, p) for n, p in self.critic_head.named_parameters()]
        cfg = replace(self.optim, head_lr=self.critic_lr or self.optim.head_lr)
        return build_optimizer(self, list(self.backbone.named_trainable()) + critic, cfg)

    def train(self, mode: bool = True):
        super().train(mode)
        for frozen in (self.ref_backbone, self.reward):
            if frozen is not None:
                frozen.eval()  # no dropout in the reference and the judge
        return self

    # ----------------------------------------------------------------------------------------------- rollout
    def respond(self, batch: dict, sample: bool) -> tuple[list[PairExample], dict]:
        """Generate one response per prompt, cut after its first EOS; returns the examples and their k=1 ``pairs``
        batch (``plain`` layout) on this module's device."""
        hp, bb = self.hparams, self.backbone
        new = bb.generate(batch["input_ids"], batch["attention_mask"], batch["pixel_values"],
                          max_new_tokens=hp.max_new_tokens, do_sample=sample, temperature=hp.temperature,
                          top_p=hp.top_p, top_k=hp.top_k)
        eos, n_tok = bb.tokenizer.eos_token_id, bb.num_image_tokens
        examples, first = [], 0
        for ids, mask, out in zip(batch["input_ids"], batch["attention_mask"], new.tolist()):
            prompt = ids[mask.bool()]
            n_img = int((prompt == bb.image_token_id).sum()) // n_tok
            response = out[:out.index(eos) + 1] if eos in out else out
            if bb.image_token_id in response:  # a sampled <image> would need image features: the response ends there
                response = response[:response.index(bb.image_token_id)] or [eos]
            examples.append(PairExample(prompt.tolist(), [response], batch["pixel_values"][first:first + n_img]))
            first += n_img
        pairs = collate_pairs(examples, bb.tokenizer.pad_token_id, layout="plain")
        return examples, {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in pairs.items()}

    def reference_logps(self, pairs: dict, image_features) -> torch.Tensor:
        if self.ref_backbone is None:
            with self.backbone.adapter_disabled():
                return pair_logps(self.backbone, pairs, image_features)["token_logps"]
        return pair_logps(self.ref_backbone, pairs)["token_logps"]

    @torch.no_grad()
    def rollout(self, batch: dict) -> dict:
        """Sample, score and evaluate one batch of prompts: every tensor is (R, T) unless said otherwise."""
        examples, pairs = self.respond(batch, sample=True)
        with eval_mode(self.backbone, self.critic):
            feats = pair_image_features(self.backbone, pairs)
            pol = pair_logps(self.backbone, pairs, feats)
            ref = self.reference_logps(pairs, feats if self.backbone.vision_frozen else None)
            values = critic_values(self.critic, self.critic_head, pairs)
        score = pair_rewards(self.reward.backbone, self.reward.head, pairs)[:, 0]  # (R,)
        norm = self.normalise(score)
        mask = pol["mask"]
        rewards, kl = token_rewards(norm, pol["token_logps"], ref, mask, self.hparams.kl_coef,
                                    self.hparams.kl_estimator)
        advantages, returns = gae(rewards, values, mask, self.hparams.gamma, self.hparams.lam)
        return {"examples": examples, "mask": mask, "logps": pol["token_logps"], "values": values,
                "advantages": masked_whiten(advantages, mask), "returns": returns, "score": score, "norm": norm,
                "kl": kl, "raw_advantages": advantages}

    def normalise(self, score: torch.Tensor) -> torch.Tensor:
        """Add the scores of every rank to the running window, then z-normalise, scale and clip (R,)."""
        hp = self.hparams
        distributed = self._trainer is not None and self.trainer.world_size > 1
        everyone = self.all_gather(score.detach()).reshape(-1) if distributed else score
        self.scores = (self.scores + everyone.float().cpu().tolist())[-hp.reward_window:]
        window = torch.tensor(self.scores)
        std = window.std().item() if len(self.scores) > 1 else 1.0
        return normalize_score(score, window.mean().item(), std, hp.reward_scale, hp.reward_clip)

    # ----------------------------------------------------------------------------------------------- update
    def ppo_losses(self, roll: dict, rows: list[int]) -> tuple[torch.Tensor, dict]:
        """PPO loss of one minibatch of the rollout (the responses ``rows``)."""
        hp = self.hparams
        examples = [roll["examples"][i] for i in rows]
        mb = collate_pairs(examples, self.backbone.tokenizer.pad_token_id, layout="plain")
        mb = {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in mb.items()}
        T = mb["targets"].shape[1]
        old = {k: roll[k][rows, :T] for k in ("mask", "logps", "values", "advantages", "returns")}
        warmup = self.rollouts < hp.critic_warmup_steps
        with torch.set_grad_enabled(not warmup):  # the policy only watches during the critic's warm-up
            pol = pair_logps(self.backbone, mb, return_logits=True)
            pg_loss, clip_frac, approx_kl = ppo_policy_loss(pol["token_logps"], old["logps"], old["advantages"],
                                                            old["mask"], hp.policy_clip)
        values = critic_values(self.critic, self.critic_head, mb)
        vf_loss, vf_clip = ppo_value_loss(values, old["values"], old["returns"], old["mask"], hp.value_clip)
        loss = hp.vf_coef * vf_loss + (0.0 if warmup else pg_loss)
        stats = {"policy_loss": pg_loss, "value_loss": vf_loss, "clip_fraction": clip_frac,
                 "value_clip_fraction": vf_clip, "approx_kl": approx_kl,
                 "entropy": entropy_from_logits(pol["logits"].detach()).mean()}
        return loss, {k: v.detach().float() for k, v in stats.items()}

    def training_step(self, batch, batch_idx):
        hp = self.hparams
        roll = self.rollout(batch)
        opt, sched = self.optimizers(), self.lr_schedulers()
        R = len(roll["examples"])
        size = hp.minibatch_size or R
        totals: dict[str, float] = {}
        updates = 0
        for _ in range(hp.ppo_epochs):
            order = torch.randperm(R).tolist()
            for i in range(0, R, size):
                loss, stats = self.ppo_losses(roll, order[i:i + size])
                opt.zero_grad()
                self.manual_backward(loss)
                if hp.max_grad_norm:
                    self.clip_gradients(opt, gradient_clip_val=hp.max_grad_norm, gradient_clip_algorithm="norm")
                opt.step()
                sched.step()
                updates += 1
                for k, v in stats.items():
                    totals[k] = totals.get(k, 0.0) + v.item()
        self.rollouts += 1
        self.log_rollout(roll, {k: v / updates for k, v in totals.items()})
        if hp.sample_every and (self.rollouts - 1) % hp.sample_every == 0:
            self.log_samples(roll["examples"], roll["score"], "ppo/samples")

    # ---------------------------------------------------------------------------------------------- logging
    def log_rollout(self, roll: dict, update_stats: dict):
        mask, R = roll["mask"], len(roll["examples"])
        adv = roll["raw_advantages"]
        metrics = {"reward_mean": roll["score"].mean(), "reward_normalised_mean": roll["norm"].mean(),
                   "kl": roll["kl"].sum(-1).mean(), "response_length": mask.sum(-1).float().mean(),
                   "advantage_mean": masked_mean(adv, mask), "advantage_std": masked_var(adv, mask).sqrt(),
                   "returns_mean": masked_mean(roll["returns"], mask),
                   "values_mean": masked_mean(roll["values"], mask), **update_stats}
        self.log_dict({f"ppo/{k}": float(v) for k, v in metrics.items()}, batch_size=R, sync_dist=True)
        self.log("ppo/critic_warmup", float(self.rollouts <= self.hparams.critic_warmup_steps), batch_size=R)

    def log_samples(self, examples: list[PairExample], score: torch.Tensor, tag: str):
        """A few (prompt, response, reward) rows as a markdown table in TensorBoard's text tab."""
        from lightning.pytorch.loggers import TensorBoardLogger

        if not isinstance(self.logger, TensorBoardLogger) or self.trainer.global_rank != 0:
            return
        decode = self.backbone.decode
        rows = ["| prompt | response | reward |", "|---|---|---|"]
        for e, s in list(zip(examples, score.tolist()))[:self.hparams.num_samples]:
            cells = [decode(torch.tensor([ids]))[0].replace("|", "\\|").replace("\n", " ")
                     for ids in (e.prompt, e.responses[0])]
            rows.append(f"| {cells[0]} | {cells[1]} | {s:.3f} |")
        self.logger.experiment.add_text(tag, "\n".join(rows), global_step=self.global_step)

    # ------------------------------------------------------------------------------------------- validation
    def validation_step(self, batch, batch_idx):
        """Greedy responses to the validation prompts, scored by the reward model (``val/reward_mean``) and their
        summed log-ratio to the reference (``val/kl``)."""
        with torch.no_grad():
            examples, pairs = self.respond(batch, sample=False)
            score = pair_rewards(self.reward.backbone, self.reward.head, pairs)[:, 0]
            feats = pair_image_features(self.backbone, pairs)
            pol = pair_logps(self.backbone, pairs, feats)["sum"][:, 0]
            ref = self.reference_logps(pairs, feats if self.backbone.vision_frozen else None).sum(-1)
        R = len(examples)
        self.log_dict({"val/reward_mean": score.mean(), "val/kl": (pol - ref).mean(),
                       "val/response_length": pairs["response_lengths"].float().mean()},
                      batch_size=R, sync_dist=True)
        if batch_idx == 0:
            self.log_samples(examples, score, "val/samples")

    # -------------------------------------------------------------------------------------------- checkpoint
    def on_save_checkpoint(self, checkpoint):
        keep_trainable(self, checkpoint)
        checkpoint["ppo"] = {"scores": list(self.scores), "rollouts": self.rollouts}

    def on_load_checkpoint(self, checkpoint):
        state = checkpoint.get("ppo", {})
        self.scores, self.rollouts = list(state.get("scores", [])), state.get("rollouts", 0)

    def on_fit_end(self):
        export_backbone(self, self.export_dir)


def check_same_tokenizer(policy: Backbone, reward: Backbone):
    """The reward model reads the policy's token ids as they are: its tokenizer must be the same."""
    a, b = policy.tokenizer, reward.tokenizer
    specials = ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id")
    mine = [len(a)] + [getattr(a, s) for s in specials] + [policy.image_token_id, policy.num_image_tokens]
    theirs = [len(b)] + [getattr(b, s) for s in specials] + [reward.image_token_id, reward.num_image_tokens]
    if mine != theirs or a.get_vocab() != b.get_vocab():
        raise ValueError("the reward model's tokenizer or image tokens differ from the policy's (vocabulary size, "
                         f"special ids, image token id, image tokens: {mine} vs {theirs}): PPO scores the policy's "
                         "token ids directly, so train the reward model from the same base checkpoint")
