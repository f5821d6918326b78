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
4. **Update** (Schulman et al. 2017, arXiv 1707.06347): ``ppo.epochs`` passes over shuffled minibatches, each
   one optimizer step on

       L = -mean_t min(rho_t A_t, clip(rho_t, 1 - eps, 1 + eps) A_t)                      rho_t = pi / pi_old
         + vf_coef * 0.5 * mean_t max((V - G)^2, (V_old + clip(V - V_old, -eps_v, eps_v) - G)^2)

   (means over the minibatch's response tokens). During the first ``critic_warmup_steps`` rollouts only the
   critic term trains.

Where this differs from the seed: the critic's value head starts from the reward model's head (the seed started
it at zero, a known bug), and the reward model, critic and reference need not be separate DeepSpeed engines:
everything that trains sits in one optimizer (one parameter group per part; the critic's at ``optim.head_lr``).
``trainer.max_steps`` counts optimizer steps: rollouts x ppo.epochs x minibatches per rollout.

The step reads top to bottom: ``rollout`` (sample -> score -> log-probs and values -> token rewards -> GAE, a typed
``Rollout``), then ``update`` (minibatches -> ``ppo_losses`` -> one optimizer step each).
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from .backbone import Backbone, BackboneConfig, LoraSpec, check_llava_checkpoint
from .data.collate import PairExample
from .generation import Sampling
from .logps import pair_hidden, pair_image_features, pair_logps
from .losses import (KL_ESTIMATORS, entropy_from_logits, gae, masked_mean, masked_var, masked_whiten,
                     normalize_score, ppo_policy_loss, ppo_value_loss, token_rewards)
from .module import CONFIG_KEY, AlignModule, is_number, require
from .optim import OptimConfig
from .reference import Reference
from .reward import RewardScorer, load_head, pair_rewards
from .rollout import Responses, sample_responses


@dataclass
class PPOConfig:
    """PPO's settings (Vision-LLM-Alignment's values in brackets).

    Args:
        kl_coef: weight of the per-token KL penalty to the reference (0.1).
        kl_estimator: per-token KL estimator: ``k1`` (log pi - log pi_ref, the seed's), ``k2`` or ``k3``.
        gamma: GAE discount (0.99).
        lam: GAE lambda (0.95).
        epochs: passes over each rollout batch (2).
        minibatch_size: responses per optimizer step; ``None``: the whole rollout batch (the seed's).
        policy_clip: epsilon of the clipped policy ratio (0.2).
        value_clip: epsilon of the clipped value update (0.2).
        vf_coef: weight of the value loss (1.0).
        max_grad_norm: gradient clipping by global norm (``None``: none). The trainer's ``gradient_clip_val``
            must stay unset: PPO optimises manually.
        reward_window: how many of the most recent reward-model scores the normalisation's mean and std use (1000).
        reward_scale: factor applied to the z-normalised score (10; the embedded default may choose less).
        reward_clip: clip of the scaled score to [-reward_clip, reward_clip] (10); ``None``: no clipping.
        critic_warmup_steps: rollouts at the start during which only the critic trains (30).
    """

    kl_coef: float = 0.1
    kl_estimator: str = "k1"
    gamma: float = 0.99
    lam: float = 0.95
    epochs: int = 2
    minibatch_size: Optional[int] = None
    policy_clip: float = 0.2
    value_clip: float = 0.2
    vf_coef: float = 1.0
    max_grad_norm: Optional[float] = 1.0
    reward_window: int = 1000
    reward_scale: float = 10.0
    reward_clip: Optional[float] = 10.0
    critic_warmup_steps: int = 0

    def validate(self, key: str = "ppo"):
        """Raise naming ``key.<field>`` (the dotted YAML key) for a value that cannot be right."""
        def bad(name, rule):
            return ValueError(f"{key}.{name} must be {rule}, got {getattr(self, name)!r}")

        if self.kl_estimator not in KL_ESTIMATORS:
            raise bad("kl_estimator", " | ".join(sorted(KL_ESTIMATORS)))
        for name in ("gamma", "lam"):
            if not (is_number(getattr(self, name)) and 0.0 <= getattr(self, name) <= 1.0):
                raise bad(name, "in [0, 1]")
        for name in ("policy_clip", "value_clip", "vf_coef", "reward_scale"):
            if not (is_number(getattr(self, name)) and 0 < getattr(self, name) < math.inf):
                raise bad(name, "> 0")
        if not (is_number(self.kl_coef) and 0 <= self.kl_coef < math.inf):
            raise bad("kl_coef", ">= 0")
        for name in ("max_grad_norm", "reward_clip"):
            if getattr(self, name) is not None and not (is_number(getattr(self, name)) and getattr(self, name) > 0):
                raise bad(name, "> 0 or null")
        for name in ("epochs", "reward_window", "minibatch_size"):
            value = getattr(self, name)
            if (value is not None or name != "minibatch_size") and not (isinstance(value, int) and value >= 1):
                raise bad(name, "an integer >= 1" + (" or null" if name == "minibatch_size" else ""))
        if not (isinstance(self.critic_warmup_steps, int) and self.critic_warmup_steps >= 0):
            raise bad("critic_warmup_steps", "an integer >= 0")


torch.serialization.add_safe_globals([PPOConfig, Sampling])  # in checkpoints' hyper-parameters (see module.py)


@dataclass
class Rollout:
    """One batch of sampled responses and everything PPO computed about them; R responses, T response tokens.

    responses: the sampled (prompt, response) examples and their batch.
    mask: (R, T) bool, the response tokens. logps, ref_logps, values: (R, T) under the policy, the reference and
    the critic at sampling time. score, norm: (R,) the reward model's score and its normalised value.
    kl: (R, T) per-token KL estimate. raw_advantages, advantages: (R, T) GAE advantages before / after whitening.
    returns: (R, T) the critic's targets.
    """

    responses: Responses
    mask: torch.Tensor
    logps: torch.Tensor
    ref_logps: torch.Tensor
    values: torch.Tensor
    score: torch.Tensor
    norm: torch.Tensor
    kl: torch.Tensor
    raw_advantages: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor

    def __len__(self) -> int:
        return len(self.responses)


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


class PPOModule(AlignModule):
    """PPO with a KL penalty to a reference, on ``prompts`` batches (see the module docstring).

    Args:
        backbone: the policy (usually the SFT model with LoRA).
        reward_model: a ``RewardModule`` export directory (``merged/`` + ``value_head.safetensors``); frozen.
        optim: optimizer and schedule of the policy and the critic (one AdamW; the critic's LoRA or language model
            and its value head train at ``head_lr``; Vision-LLM-Alignment: actor 1e-5, critic 2e-5).
            ``trainer.max_steps`` counts its steps.
        ppo: PPO's own settings (``PPOConfig``).
        sampling: how rollouts sample (Vision-LLM-Alignment: up to 512 new tokens, temperature 0.75, top-k 50,
            top-p 0.95; the shapes world needs ~24 tokens). Validation answers greedily.
        critic_lora: LoRA of the critic, a copy of the reward model's backbone; ``r: 0`` trains its whole language
            model (the seed's choice).
        reference: ``adapter`` (the policy with LoRA disabled; no extra weights) or ``copy`` (a frozen copy of the
            policy's source, for full fine-tuning).
        sample_every: every this many rollouts, log a few (prompt, response, reward) as text to TensorBoard
            (0: never).
        num_samples: how many samples to log.
        export_dir: export the trained policy there at the end of ``fit`` (``merged/`` and ``adapter/``).
    """

    def __init__(self, backbone: BackboneConfig = BackboneConfig(), reward_model: str = "runs/reward/export",
                 optim: OptimConfig = OptimConfig(lr=1e-5), ppo: PPOConfig = PPOConfig(),
                 sampling: Sampling = Sampling(max_new_tokens=512, do_sample=True, temperature=0.75, top_p=0.95,
                                               top_k=50),
                 critic_lora: LoraSpec = LoraSpec(r=16, alpha=32.0, dropout=0.0), reference: str = "adapter",
                 sample_every: int = 50, num_samples: int = 4, export_dir: Optional[str] = None):
        ppo.validate(f"{CONFIG_KEY}.ppo")
        critic_lora.validate(f"{CONFIG_KEY}.critic_lora")
        require(reference in ("adapter", "copy"), "reference", "adapter | copy", reference)
        require(isinstance(sample_every, int) and sample_every >= 0, "sample_every", "an integer >= 0", sample_every)
        require(isinstance(num_samples, int) and num_samples >= 0, "num_samples", "an integer >= 0", num_samples)
        super().__init__(backbone, optim, export_dir)  # checks optim and backbone first
        if not os.path.isfile(os.path.join(reward_model, "value_head.safetensors")):
            raise FileNotFoundError(f"{CONFIG_KEY}.reward_model: {reward_model!r} is not a RewardModule export "
                                    "directory (merged/ and value_head.safetensors): train one first, e.g. with "
                                    "conf/reward.yaml")
        check_llava_checkpoint(os.path.join(reward_model, "merged"), f"{CONFIG_KEY}.reward_model")
        self.automatic_optimization = False
        self.cfg, self.sampling, self.reward_model = ppo, sampling, reward_model
        self.sample_every, self.num_samples = sample_every, num_samples
        self.reference = Reference(reference, backbone)
        self.critic = Backbone(BackboneConfig(
            checkpoint=os.path.join(reward_model, "merged"), lora=critic_lora, train_vision=False,
            train_projector=False, train_language=True, gradient_checkpointing=backbone.gradient_checkpointing,
            attn_implementation=backbone.attn_implementation, dtype=backbone.dtype))
        self.reward: Optional[RewardScorer] = None
        self.critic_head: Optional[nn.Linear] = None
        self.scores: list[float] = []  # the running window of raw reward-model scores
        self.rollouts = 0

    # ------------------------------------------------------------------------------------------------- setup
    def batch_spec(self) -> dict:
        return {"format": "prompts"}

    def setup(self, stage: str):
        config = getattr(self.trainer.strategy, "config", None)
        if isinstance(config, dict) and self.cfg.max_grad_norm:
            config.setdefault("gradient_clipping", self.cfg.max_grad_norm)  # DeepSpeed clips inside its step

    def build(self, deepspeed_config):
        self.critic.build(deepspeed_config)
        self.reference.build(deepspeed_config)
        self.reward = RewardScorer.load(self.reward_model, dtype=self.backbone.config.dtype,
                                        deepspeed_config=deepspeed_config)
        # V starts as the reward model: critic backbone = the reward model's, critic head = its value head
        self.critic_head = load_head(os.path.join(self.reward_model, "value_head.safetensors"))
        check_same_tokenizer(self.backbone, self.reward.backbone)

    def trainable(self):
        yield from self.backbone.named_trainable()
        yield from (("head", n, p) for _, n, p in self.critic.named_trainable())
        yield from (("head", n, p) for n, p in self.critic_head.named_parameters())

    # ----------------------------------------------------------------------------------------------- rollout
    @torch.no_grad()
    def rollout(self, prompts: dict) -> Rollout:
        """Sample a response per prompt, score it, and compute its log-probs, values, rewards and advantages."""
        cfg = self.cfg
        responses = sample_responses(self.backbone, prompts, self.sampling)
        batch = responses.batch
        with eval_mode(self.backbone, self.critic):
            feats = pair_image_features(self.backbone, batch)
            pol = pair_logps(self.backbone, batch, feats)
            ref = self.reference.logps(self.backbone, batch, feats)
            values = critic_values(self.critic, self.critic_head, batch)
        score = pair_rewards(self.reward.backbone, self.reward.head, batch)[:, 0]  # (R,)
        norm = self.normalise(score)
        rewards, kl = token_rewards(norm, pol.token_logps, ref.token_logps, pol.mask, cfg.kl_coef, cfg.kl_estimator)
        advantages, returns = gae(rewards, values, pol.mask, cfg.gamma, cfg.lam)
        return Rollout(responses, pol.mask, pol.token_logps, ref.token_logps, values, score, norm, kl,
                       advantages, masked_whiten(advantages, pol.mask), returns)

    def normalise(self, score: torch.Tensor) -> torch.Tensor:
        """Add the scores of every rank to the running window, then z-normalise, scale and clip (R,)."""
        cfg = self.cfg
        distributed = self._trainer is not None and self.trainer.world_size > 1
        everyone = self.all_gather(score.detach()).reshape(-1) if distributed else score
        self.scores = (self.scores + everyone.float().cpu().tolist())[-cfg.reward_window:]
        window = torch.tensor(self.scores)
        std = window.std().item() if len(self.scores) > 1 else 1.0
        return normalize_score(score, window.mean().item(), std, cfg.reward_scale, cfg.reward_clip)

    # ----------------------------------------------------------------------------------------------- update
    def ppo_losses(self, roll: Rollout, rows: list[int]) -> tuple[torch.Tensor, dict]:
        """PPO loss of one minibatch of the rollout (the responses ``rows``)."""
        cfg = self.cfg
        mb = roll.responses.minibatch(rows)
        T = mb["targets"].shape[1]
        mask, old_logps, old_values = roll.mask[rows, :T], roll.logps[rows, :T], roll.values[rows, :T]
        advantages, returns = roll.advantages[rows, :T], roll.returns[rows, :T]
        warmup = self.rollouts < cfg.critic_warmup_steps
        with torch.set_grad_enabled(not warmup):  # the policy only watches during the critic's warm-up
            pol = pair_logps(self.backbone, mb, keep_logits=True)
            pg_loss, clip_frac, approx_kl = ppo_policy_loss(pol.token_logps, old_logps, advantages, mask,
                                                            cfg.policy_clip)
        values = critic_values(self.critic, self.critic_head, mb)
        vf_loss, vf_clip = ppo_value_loss(values, old_values, returns, mask, cfg.value_clip)
        loss = cfg.vf_coef * vf_loss + (0.0 if warmup else pg_loss)
        stats = {"loss": loss, "policy_loss": pg_loss, "value_loss": vf_loss, "clip_fraction": clip_frac,
                 "value_clip_fraction": vf_clip, "approx_kl": approx_kl,
                 "entropy": entropy_from_logits(pol.logits.detach()).mean()}
        return loss, {k: v.detach().float() for k, v in stats.items()}

    def update(self, roll: Rollout, ids: list) -> dict[str, float]:
        """``epochs`` passes of shuffled minibatches over the rollout, one optimizer step each; mean statistics.

        ids: the prompts' sample ids (response i answers prompt i), named when a step's loss or gradients are not
        finite; such a step is skipped or stops the run (``optim.nonfinite``, ``AlignModule.guard_step``). A skipped
        step still counts (``trainer.global_step``, ``max_steps``) and advances the schedule, as in automatic
        optimisation: ``optimizer.step()`` runs on no gradients.
        """
        cfg = self.cfg
        opt, sched = self.optimizers(), self.lr_schedulers()
        R = len(roll)
        size = cfg.minibatch_size or R
        totals: dict[str, float] = {}
        updates = 0
        for _ in range(cfg.epochs):
            order = torch.randperm(R).tolist()
            for i in range(0, R, size):
                rows = order[i:i + size]
                loss, stats = self.ppo_losses(roll, rows)
                opt.zero_grad()
                self.manual_backward(loss)
                finite = self.guard_step([loss], [ids[r] for r in rows] if ids else [], opt)
                if finite and cfg.max_grad_norm:
                    self.clip_gradients(opt, gradient_clip_val=cfg.max_grad_norm, gradient_clip_algorithm="norm")
                opt.step()  # after a skip the gradients are gone: nothing changes, but the step counts (max_steps)
                sched.step()
                updates += 1
                for k, v in stats.items():
                    totals[k] = totals.get(k, 0.0) + v.item()
        return {k: v / updates for k, v in totals.items()}

    def training_step(self, batch, batch_idx):
        roll = self.rollout(batch)
        update_stats = self.update(roll, batch.get("ids", []))
        self.rollouts += 1
        self.log_rollout(roll, update_stats, batch)
        if self.sample_every and (self.rollouts - 1) % self.sample_every == 0:
            self.log_samples(roll.responses.examples, roll.score, "train/samples")

    # ---------------------------------------------------------------------------------------------- logging
    def log_rollout(self, roll: Rollout, update_stats: dict, batch: dict):
        mask, adv = roll.mask, roll.raw_advantages
        metrics = {"reward_mean": roll.score.mean(), "reward_normalised_mean": roll.norm.mean(),
                   "kl": roll.kl.sum(-1).mean(), "response_length": mask.sum(-1).float().mean(),
                   "advantage_mean": masked_mean(adv, mask), "advantage_std": masked_var(adv, mask).sqrt(),
                   "returns_mean": masked_mean(roll.returns, mask), "values_mean": masked_mean(roll.values, mask),
                   "critic_warmup": float(self.rollouts <= self.cfg.critic_warmup_steps), **update_stats}
        self.log_metrics(metrics, batch, batch_size=len(roll))

    def log_samples(self, examples: list[PairExample], score: torch.Tensor, tag: str):
        """A few (prompt, response, reward) rows as a markdown table in TensorBoard's text tab."""
        from lightning.pytorch.loggers import TensorBoardLogger

        if not isinstance(self.logger, TensorBoardLogger) or self.trainer.global_rank != 0:
            return
        decode = self.backbone.decode
        rows = ["| prompt | response | reward |", "|---|---|---|"]
        for e, s in list(zip(examples, score.tolist()))[:self.num_samples]:
            cells = [decode(torch.tensor([ids]))[0].replace("|", "\\|").replace("\n", " ")
                     for ids in (e.prompt, e.responses[0])]
            rows.append(f"| {cells[0]} | {cells[1]} | {s:.3f} |")
        self.logger.experiment.add_text(tag, "\n".join(rows), global_step=self.global_step)

    # ------------------------------------------------------------------------------------------- validation
    def validation_step(self, batch, batch_idx):
        """Greedy responses to the validation prompts, scored by the reward model (``val/reward_mean``) and their
        summed log-ratio to the reference (``val/kl``)."""
        with torch.no_grad():
            responses = sample_responses(self.backbone, batch, Sampling(self.sampling.max_new_tokens))
            pairs = responses.batch
            score = pair_rewards(self.reward.backbone, self.reward.head, pairs)[:, 0]
            feats = pair_image_features(self.backbone, pairs)
            pol = pair_logps(self.backbone, pairs, feats).sum[:, 0]
            ref = self.reference.logps(self.backbone, pairs, feats).sum[:, 0]
        self.log_metrics({"reward_mean": score.mean(), "kl": (pol - ref).mean(),
                          "response_length": pairs["response_lengths"].float().mean()}, batch,
                         batch_size=len(responses))
        if batch_idx == 0:
            self.log_samples(responses.examples, score, "val/samples")

    # -------------------------------------------------------------------------------------------- checkpoint
    def on_save_checkpoint(self, checkpoint):
        super().on_save_checkpoint(checkpoint)
        checkpoint["ppo"] = {"scores": list(self.scores), "rollouts": self.rollouts}

    def on_load_checkpoint(self, checkpoint):
        super().on_load_checkpoint(checkpoint)
        state = checkpoint.get("ppo", {})
        self.scores, self.rollouts = list(state.get("scores", [])), state.get("rollouts", 0)


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
