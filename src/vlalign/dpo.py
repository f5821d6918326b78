"""Direct preference optimisation of a LLaVA model on image preference pairs (or ranked lists), and its family.

    python src/train.py fit --config conf/dpo.yaml

For a prompt x (image + question) with responses ranked y_0 > y_1 (> ... > y_{k-1}):

    logratio_i = log pi(y_i | x) - log pi_ref(y_i | x)                      (batch, k)
    L          = sum_j w_j loss_j(logratio, beta, ...)   e.g. sigmoid DPO: -log sigmoid(beta (logratio_0 - logratio_1))

with each loss chosen by name from ``losses.PREFERENCE_LOSSES`` (``loss: sigmoid``) or a weighted sum of several
(``loss: {sigmoid: 0.8, bco_pair: 0.2, sft: 1.0}``, Mixed Preference Optimization), and log pi either summed over
the response tokens (``logp: sum``, standard) or averaged (``logp: mean``, mllm-dpo's "use average", IPO).
Reference-free losses (SimPO, CPO, ORPO) read the policy's log-probs only: no reference pass runs for them.

The reference pi_ref is held as ``reference.Reference`` says: the policy with its adapter disabled, a frozen
copy, log-probs precomputed in the shards, or none. The pair's image and prompt are computed once
(``layout: packed``: one sequence [prompt | chosen | rejected] with a block mask) and the image features are
reused by the reference pass when the vision tower and projector are frozen. ``layout: plain`` runs each
[prompt | response] on its own (the oracle).
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Optional, Union

import torch

from .backbone import BackboneConfig
from .callbacks import forward_flops
from .logps import PairLogps, pair_image_features, pair_logps
from .losses import Objective, dpo_rewards, noisy_rejected_token_logps
from .module import CONFIG_KEY, AlignModule, is_number, require
from .optim import OptimConfig
from .reference import MODES, Reference


class DPOModule(AlignModule):
    """DPO and its family on ``pairs`` batches.

    Args:
        backbone: the policy (usually an SFT checkpoint with LoRA).
        optim: optimizer and schedule.
        loss: a name in ``losses.PREFERENCE_LOSSES`` (``python -m vlalign.losses`` lists them), or a weighted
            sum ``{name: weight, ...}``.
        beta: the KL-strength / inverse temperature beta (SimPO's and ORPO's own beta / lambda for those).
        loss_params: the losses' own parameters by name (``label_smoothing``, ``alpha``, ``gamma``, ``tau``).
        logp: ``sum`` (standard) or ``mean`` (length-normalised) log-probs in ``logratios``.
        reference: ``adapter``, ``copy``, ``precomputed`` or ``none`` (``reference.py``); reference-free losses
            never run one.
        reference_backbone: the reference model for ``copy`` (default: the policy's source, without LoRA, frozen).
        layout: ``packed`` (shared prefix computed once per pair) or ``plain``.
        num_responses: 2 for chosen/rejected pairs; k > 2 trains on the first k ranked candidates (use
            ``loss: plackett_luce``).
        rejected_scoring: ``standard``, or ``noisy``: SIMA/POVID's non-standard scoring of the rejected side by the
            model's own top-1 (top-2 where top-1 is the label) token log-probs instead of the rejected tokens.
        export_dir: export the trained policy there at the end of ``fit`` (``merged/`` and ``adapter/``).
    """

    def __init__(self, backbone: BackboneConfig = BackboneConfig(), optim: OptimConfig = OptimConfig(lr=5e-4),
                 loss: Union[str, dict[str, float]] = "sigmoid", beta: float = 0.1,
                 loss_params: Optional[dict[str, float]] = None, logp: str = "sum", reference: str = "adapter",
                 reference_backbone: Optional[BackboneConfig] = None, layout: str = "packed",
                 num_responses: int = 2, rejected_scoring: str = "standard", export_dir: Optional[str] = None):
        try:
            objective = Objective.parse(loss, loss_params)
        except ValueError as e:
            raise ValueError(f"{CONFIG_KEY}.loss / loss_params: {e}") from e
        require(is_number(beta) and 0 < beta < math.inf, "beta", "> 0", beta)
        require(logp in ("sum", "mean"), "logp", "sum | mean", logp)
        if logp == "mean" and "logratios" not in objective.inputs:
            raise ValueError(f"{CONFIG_KEY}.logp 'mean' averages the log-probs of logratios, which "
                             f"{sorted(objective.terms)} do not read (they take summed log-probs and lengths): use "
                             "logp 'sum'")
        require(layout in ("packed", "plain"), "layout", "packed | plain", layout)
        require(rejected_scoring in ("standard", "noisy"), "rejected_scoring", "standard | noisy", rejected_scoring)
        require(reference in MODES, "reference", " | ".join(MODES), reference)
        require(isinstance(num_responses, int) and num_responses >= 2, "num_responses", "an integer >= 2",
                num_responses)
        if not objective.needs_reference:
            reference, reference_backbone = "none", None  # reference-free: nothing to build or run
        elif reference == "none":
            raise ValueError(f"{CONFIG_KEY}.reference: the loss {sorted(objective.terms)} needs a reference model; "
                             "reference 'none' is for reference-free losses (simpo, cpo, orpo, sft)")
        if rejected_scoring == "noisy" and (num_responses != 2 or reference == "precomputed"):
            raise ValueError(f"{CONFIG_KEY}.rejected_scoring: noisy rejected scoring needs pairs (num_responses 2) "
                             "and an online reference")
        if reference_backbone is not None:
            reference_backbone.validate(f"{CONFIG_KEY}.reference_backbone")
        super().__init__(backbone, optim, export_dir)
        self.objective = objective
        self.beta, self.logp, self.layout = beta, logp, layout
        self.num_responses, self.rejected_scoring = num_responses, rejected_scoring
        self.reference = Reference(reference, backbone, reference_backbone)
        self.register_buffer("reward_stats", torch.zeros(2), persistent=True)  # BCO's running mean: (count, mean)
        self._check_loss_shapes()

    def _check_loss_shapes(self):
        """Run the objective on zeros of this module's shapes, so a wrong pairing fails here and not at step 1."""
        k = self.num_responses
        z = torch.zeros(2, k)
        dummy = {"logratios": z, "policy_logps": z - 1, "ref_logps": z - 1, "lengths": z + 1,
                 "chosen_nll": torch.zeros(2)}
        try:
            self.objective(self.beta, **dummy)
        except ValueError as e:
            raise ValueError(f"{CONFIG_KEY}.num_responses: the loss {dict(self.objective.terms)} cannot train on "
                             f"num_responses={k}: {e}") from e

    # ------------------------------------------------------------------------------------------------- setup
    def batch_spec(self) -> dict:
        """Pairs; the shards' stored reference log-probs only for ``reference: precomputed``, the one mode that reads
        them (elsewhere log-probs made with another tokenizer must not drop pairs as ``ref_mismatch``)."""
        return {"format": "pairs", "layout": self.layout, "num_responses": self.num_responses,
                "ref_logps": self.reference.mode == "precomputed"}

    def build(self, deepspeed_config):
        self.reference.build(deepspeed_config)

    # ------------------------------------------------------------------------------------------------ compute
    def _noisy(self, out: PairLogps, batch: dict) -> PairLogps:
        """The rejected side scored by SIMA/POVID's noisy token log-probs (the option, not the default)."""
        rows = torch.arange(out.mask.shape[0], device=out.mask.device) % 2 == 1  # response 1 of each pair
        full = out.logits.new_zeros(*out.mask.shape, out.logits.shape[-1])
        full[out.mask] = out.logits
        noisy = noisy_rejected_token_logps(full[rows], batch["targets"][rows])
        sums = out.sum.clone()
        sums[:, 1] = noisy.sum(-1)
        means = out.mean.clone()
        means[:, 1] = sums[:, 1] / out.tokens[:, 1].clamp(min=1)
        return replace(out, sum=sums, mean=means)

    def policy_logps(self, batch: dict, image_features=None) -> PairLogps:
        noisy = self.rejected_scoring == "noisy"
        out = pair_logps(self.backbone, batch, image_features, keep_logits=noisy)
        return self._noisy(out, batch) if noisy else out

    def reference_logps(self, batch: dict, image_features=None) -> PairLogps:
        """Reference log-probs (batch, k); never builds a graph."""
        noisy = self.rejected_scoring == "noisy"
        out = self.reference.logps(self.backbone, batch, image_features, keep_logits=noisy)
        return self._noisy(out, batch) if noisy else out

    def _reward_mean(self, logratios: torch.Tensor) -> torch.Tensor:
        """The running mean of beta * logratios over training steps (BCO's delta), across ranks."""
        batch_mean = dpo_rewards(logratios.detach(), self.beta).mean()
        if self.training:
            batch_mean = self.all_gather(batch_mean).mean() if self._trainer is not None else batch_mean
            count, mean = self.reward_stats
            self.reward_stats.copy_(torch.stack([count + 1, mean + (batch_mean - mean) / (count + 1)]))
        return self.reward_stats[1] if self.reward_stats[0] > 0 else batch_mean

    def step(self, batch: dict) -> tuple[torch.Tensor, dict]:
        feats = pair_image_features(self.backbone, batch)
        pol = self.policy_logps(batch, feats)
        inputs = {"policy_logps": pol.sum, "lengths": pol.tokens, "chosen_nll": -pol.mean[:, 0]}
        if self.objective.needs_reference:
            ref = self.reference_logps(batch, feats)
            inputs["logratios"] = pol.get(self.logp) - ref.get(self.logp).to(pol.sum.dtype)  # (batch, k)
            inputs["ref_logps"] = ref.sum.to(pol.sum.dtype)
            if "reward_mean" in self.objective.inputs:
                inputs["reward_mean"] = self._reward_mean(inputs["logratios"])
            rewards = dpo_rewards(inputs["logratios"].detach(), self.beta)
        else:  # reference-free: the implicit reward is the (scaled) policy log-prob, as TRL's CPO/SimPO log it
            rewards = self.beta * pol.get(self.logp).detach()
        losses, parts = self.objective(self.beta, **inputs)
        chosen, rejected = rewards[:, 0], rewards[:, -1]
        metrics = {
            "rewards/chosen": chosen.mean(),
            "rewards/rejected": rejected.mean(),
            "rewards/margins": (chosen - rejected).mean(),
            "rewards/accuracies": (chosen > rejected).float().mean(),
            "logps/chosen": pol.sum[:, 0].detach().mean(),
            "logps/rejected": pol.sum[:, -1].detach().mean(),
        }
        if len(parts) > 1:
            metrics.update({f"loss/{name}": part.detach().mean() for name, part in parts.items()})
        return losses.mean(), metrics

    def extra_forward_flops(self, batch: dict) -> float:
        """The reference pass, for the Benchmark callback (none when precomputed or reference-free)."""
        if not (self.objective.needs_reference and self.reference.runs_forward):
            return 0.0
        lengths = (batch["segment_ids"] >= 0).sum(-1).tolist() if "segment_ids" in batch else \
            batch["attention_mask"].sum(-1).tolist()
        pv = batch["pixel_values"]
        n_img = 0 if self.backbone.vision_frozen or pv.dim() != 4 else int(pv.shape[0])
        return forward_flops(self.backbone, lengths, n_img)
