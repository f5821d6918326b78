"""Pure tensor functions for preference alignment: the DPO family, ranking losses and the pieces of PPO.

Nothing here holds state or configuration: a LightningModule gathers the tensors and calls these. Variants are
chosen by name from the tables ``PREFERENCE_LOSSES``, ``RANKING_LOSSES`` and ``KL_ESTIMATORS``.

Preference losses share one signature, ``fn(logratios, beta, **params) -> (batch,)``, where

    logratios[:, i] = log pi(y_i | x) - log pi_ref(y_i | x)        (batch, k), candidates ranked best first

so column 0 is the chosen response. Pairwise losses need k == 2 (the caller picks the columns). Their extra
parameters are explicit keyword arguments with defaults, so a caller can ask ``inspect.signature(fn)`` whether a
loss takes, say, ``chosen_nll``.

Length-normalised DPO (mllm-dpo's "use average", and the per-token averages of IPO's paper) is not a separate
loss: the caller passes mean instead of summed response log-probs.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

# ------------------------------------------------------------------------------------------ preference (DPO)


def _margin(logratios: Tensor, loss: str) -> Tensor:
    """d = logratio_chosen - logratio_rejected (batch,), checking the pairwise shape (batch, 2)."""
    if logratios.dim() != 2 or logratios.shape[1] != 2:
        raise ValueError(f"the {loss!r} loss compares pairs: logratios must be (batch, 2) with the chosen response "
                         f"in column 0, got shape {tuple(logratios.shape)}")
    return logratios[:, 0] - logratios[:, 1]


def dpo_rewards(logratios: Tensor, beta: float) -> Tensor:
    """DPO's implicit rewards r_i = beta * (log pi(y_i|x) - log pi_ref(y_i|x)), same shape as ``logratios``.

    Logged as rewards/chosen, rewards/rejected, rewards/margins (arXiv 2305.18290, section 5).
    """
    return beta * logratios


def sigmoid_loss(logratios: Tensor, beta: float) -> Tensor:
    """DPO: L = -log sigmoid(beta * d), d = logratio_chosen - logratio_rejected.

    Rafailov et al. 2023, "Direct Preference Optimization", https://arxiv.org/abs/2305.18290.
    logratios: (batch, 2). Returns (batch,). Equals log 2 when the policy equals the reference.
    The loss of SeVa, SIMA and mllm-dpo (beta 0.1).
    """
    return -F.logsigmoid(beta * _margin(logratios, "sigmoid"))


def conservative_loss(logratios: Tensor, beta: float, label_smoothing: float = 0.0) -> Tensor:
    """Conservative DPO (cDPO): L = -(1 - eps) log sigmoid(beta d) - eps log sigmoid(-beta d).

    The preference label is taken to be flipped with probability eps = ``label_smoothing``
    (Mitchell 2023, "A note on DPO with noisy preferences"; the DPO loss of Vision-LLM-Alignment).
    eps = 0 is plain DPO. logratios: (batch, 2). Returns (batch,).
    """
    z = beta * _margin(logratios, "conservative")
    return -(1.0 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)


def ipo_loss(logratios: Tensor, beta: float) -> Tensor:
    """IPO: L = (d - 1 / (2 beta))^2, regressing the margin onto a fixed target instead of pushing it to infinity.

    Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human Preferences",
    https://arxiv.org/abs/2310.12036. Here beta plays the role of the paper's tau, as in TRL. The paper's
    derivation uses per-token averaged log-probs: pass mean (not summed) response log-probs to follow it.
    logratios: (batch, 2). Returns (batch,).
    """
    return (_margin(logratios, "ipo") - 1.0 / (2.0 * beta)) ** 2


def hinge_loss(logratios: Tensor, beta: float) -> Tensor:
    """SLiC-style hinge: L = max(0, 1 - beta d).

    Zhao et al. 2023, "SLiC-HF: Sequence Likelihood Calibration with Human Feedback",
    https://arxiv.org/abs/2305.10425 (calibration term, with the reference log-ratio as in TRL's "hinge").
    logratios: (batch, 2). Returns (batch,).
    """
    return F.relu(1.0 - beta * _margin(logratios, "hinge"))


def rpo_loss(logratios: Tensor, beta: float, *, chosen_nll: Tensor, alpha: float = 1.0) -> Tensor:
    """DPO plus a weighted NLL of the chosen response: L = -log sigmoid(beta d) + alpha * NLL(y_chosen).

    Pang et al. 2024, "Iterative Reasoning Preference Optimization", https://arxiv.org/abs/2404.19733; mllm-dpo's
    optional SFT weight. The NLL term keeps the chosen response likely while the margin grows.
    logratios: (batch, 2). chosen_nll: (batch,), the mean per-token NLL of the chosen response under the policy
    (it must carry the policy's graph). Returns (batch,).
    """
    return sigmoid_loss(logratios, beta) + alpha * chosen_nll


def plackett_luce_dpo_loss(logratios: Tensor, beta: float, mask: Optional[Tensor] = None) -> Tensor:
    """Listwise DPO: the Plackett-Luce likelihood of the ranking under implicit rewards beta * logratio.

        L = -sum_{i=0}^{k-2} log( exp(beta lr_i) / sum_{j>=i} exp(beta lr_j) )

    Rafailov et al. 2023 (https://arxiv.org/abs/2305.18290, appendix A.3); Vision-LLM-Alignment's DPO for
    k > 2 ranked candidates. Equal to ``sigmoid_loss`` when k = 2.
    logratios: (batch, k), best first. mask: optional (batch, k) bool, True for candidates that are present (rows
    with fewer candidates are padded, usually at the end). Returns (batch,).
    """
    return plackett_luce(beta * logratios, mask)


PREFERENCE_LOSSES: dict[str, Callable[..., Tensor]] = {
    "sigmoid": sigmoid_loss,
    "conservative": conservative_loss,
    "ipo": ipo_loss,
    "hinge": hinge_loss,
    "rpo": rpo_loss,
    "plackett_luce": plackett_luce_dpo_loss,
}


def noisy_rejected_token_logps(logits: Tensor, labels: Tensor) -> Tensor:
    """SIMA/POVID's non-standard "noisy" token log-probs for the rejected side.

    Per position t, the log-prob of the model's own top-1 token, or of its top-2 token where top-1 is the label:

        y'_t = top2_t if top1_t == labels_t else top1_t,      out_t = log softmax(logits_t)[y'_t]

    Standard DPO scores the rejected response's own tokens; SIMA's patched trainer (inherited from POVID,
    https://arxiv.org/abs/2402.11411) scored the rejected side this way instead. Offered as an option only.
    Ties between logits are broken by ``torch.topk``.
    logits: (batch, seq, vocab), already aligned with labels (logits[:, t] predicts labels[:, t]).
    labels: (batch, seq), -100 where nothing is predicted. Returns (batch, seq) float32, 0 at -100 positions.
    """
    mask = labels != -100
    logps = logits.float().log_softmax(-1)
    top2 = logits.topk(2, dim=-1).indices  # (batch, seq, 2)
    pick = torch.where(top2[..., 0] == labels, top2[..., 1], top2[..., 0])
    out = torch.gather(logps, -1, pick.unsqueeze(-1)).squeeze(-1)
    return torch.where(mask, out, torch.zeros_like(out))


# ------------------------------------------------------------------------------------------ ranking (reward)


def bradley_terry(chosen: Tensor, rejected: Tensor) -> Tensor:
    """Bradley-Terry pairwise loss: L = -log sigmoid(r_chosen - r_rejected).

    Bradley & Terry 1952; the reward-model loss of InstructGPT (Ouyang et al. 2022, https://arxiv.org/abs/2203.02155).
    chosen, rejected: (batch,) scalar rewards. Returns (batch,).
    """
    return -F.logsigmoid(chosen - rejected)


def plackett_luce(scores: Tensor, mask: Optional[Tensor] = None) -> Tensor:
    """Plackett-Luce listwise loss of a best-first ranking: L = -sum_i log( exp(s_i) / sum_{j>=i} exp(s_j) ).

    Plackett 1975, Luce 1959; Vision-LLM-Alignment's reward-model loss. Equal to ``bradley_terry`` when k = 2.
    The last present candidate's term is log 1 = 0, so sums over i < k-1 and i < k agree.
    scores: (batch, k), best first. mask: optional (batch, k) bool, True where the candidate is present; absent
    candidates are skipped, exactly as if they were dropped from the row. Returns (batch,); 0 for rows with
    fewer than two candidates.
    """
    if mask is None:
        tail = torch.logcumsumexp(scores.flip(-1), dim=-1).flip(-1)  # log sum_{j>=i} exp(s_j)
        return -(scores - tail).sum(-1)
    mask = mask.bool()
    # A finite floor instead of -inf: exp(floor - x) underflows to exactly 0 in the forward pass, and no
    # -inf - (-inf) appears anywhere to turn the backward pass into NaN.
    floor = torch.finfo(scores.dtype).min
    s = scores.masked_fill(~mask, floor)
    tail = torch.logcumsumexp(s.flip(-1), dim=-1).flip(-1)
    terms = torch.where(mask, s - tail, torch.zeros_like(s))
    return -terms.sum(-1)


def _bradley_terry_scores(scores: Tensor, mask: Optional[Tensor] = None) -> Tensor:
    """``bradley_terry`` in the table's form: scores (batch, 2), chosen first; rows missing a candidate give 0."""
    if scores.dim() != 2 or scores.shape[1] != 2:
        raise ValueError(f"bradley_terry compares pairs: scores must be (batch, 2), got shape {tuple(scores.shape)}; "
                         "use plackett_luce for k > 2")
    loss = bradley_terry(scores[:, 0], scores[:, 1])
    if mask is not None:
        loss = torch.where(mask.bool().all(-1), loss, torch.zeros_like(loss))
    return loss


RANKING_LOSSES: dict[str, Callable[..., Tensor]] = {
    "bradley_terry": _bradley_terry_scores,
    "plackett_luce": plackett_luce,
}


# ------------------------------------------------------------------------------------------ masked statistics


def masked_sum(x: Tensor, mask: Tensor, dim: Optional[int] = None) -> Tensor:
    """Sum of x over the entries where mask is True (over all entries, or along ``dim``)."""
    x = torch.where(mask.bool(), x, torch.zeros_like(x))  # where, not multiply: NaN/inf under padding stays out
    return x.sum() if dim is None else x.sum(dim)


def masked_mean(x: Tensor, mask: Tensor, dim: Optional[int] = None) -> Tensor:
    """Mean of x over the entries where mask is True; 0 where no entry is (instead of NaN)."""
    count = mask.bool().sum() if dim is None else mask.bool().sum(dim)
    return masked_sum(x, mask, dim) / count.clamp(min=1)


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance (scalar) of x over the entries where mask is True.

    unbiased: divide by n - 1 (Bessel) instead of n. Returns 0 when there are fewer entries than needed
    (no host sync to check, so it is safe inside a compiled or distributed step).
    """
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        n = mask.bool().sum()
        var = var * n / (n - 1).clamp(min=1)
    return var


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """Standardise x over the entries where mask is True: (x - mean) / sqrt(var + eps).

    Uses the population variance, so the masked entries of the result have mean 0 and variance 1 (divide by n).
    shift_mean=False adds the mean back (scale only). Masked-out entries of the result are 0, like the
    advantages they usually are.
    """
    mean = masked_mean(x, mask)
    var = masked_var(x, mask, unbiased=False)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return torch.where(mask.bool(), out, torch.zeros_like(out))


# ------------------------------------------------------------------------------------------ PPO


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation over response tokens.

        delta_t = r_t + gamma V_{t+1} - V_t          V_{t+1} = 0 after the last valid token (the episode ends)
        A_t     = sum_{l>=0} (gamma lam)^l delta_{t+l} = delta_t + gamma lam A_{t+1}
        R_t     = A_t + V_t                          the critic's regression target

    Schulman et al. 2016, "High-Dimensional Continuous Control Using GAE", https://arxiv.org/abs/1506.02438.
    rewards, values, mask: (batch, T); mask marks the valid response tokens, right-padded (a prefix of each row).
    Returns (advantages, returns), each (batch, T), 0 at masked positions. Call it without grad (rollout data).
    """
    m = mask.to(values.dtype)
    T = rewards.shape[1]
    next_value = torch.zeros_like(values[:, 0])
    next_adv = torch.zeros_like(values[:, 0])
    advantages = []
    for t in reversed(range(T)):
        # next_* are already 0 past a row's end, because they were masked when computed at t + 1.
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        adv = (delta + gamma * lam * next_adv) * m[:, t]
        advantages.append(adv)
        next_value, next_adv = values[:, t] * m[:, t], adv
    advantages = torch.stack(advantages[::-1], dim=1)
    returns = (advantages + values) * m
    return advantages, returns


def ppo_policy_loss(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor,
                    clip: float) -> tuple[Tensor, Tensor, Tensor]:
    """PPO's clipped surrogate: L = masked_mean( max(-A rho, -A clip(rho, 1 - eps, 1 + eps)) ), rho = pi / pi_old.

    Schulman et al. 2017, "Proximal Policy Optimization Algorithms", https://arxiv.org/abs/1707.06347 (eq. 7,
    negated for minimisation). logp, old_logp, advantages, mask: (batch, T) per-token; eps = ``clip``.
    Returns scalars (loss, clip_fraction, approx_kl): clip_fraction is the fraction of valid tokens where the
    clipped term is the larger (its gradient is cut); approx_kl = masked_mean(0.5 (logp - old_logp)^2), Schulman's
    k2 estimator of KL(pi_old || pi) from the old policy's samples. The two statistics are detached.
    """
    ratio = torch.exp(logp - old_logp)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip, 1.0 + clip)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        clip_fraction = masked_mean((clipped > unclipped).to(logp.dtype), mask)
        approx_kl = masked_mean(0.5 * (logp - old_logp) ** 2, mask)
    return loss, clip_fraction, approx_kl


def ppo_value_loss(values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor,
                   clip: float) -> tuple[Tensor, Tensor]:
    """Clipped value loss: L = 0.5 masked_mean( max((V - R)^2, (V_clip - R)^2) ), V_clip = clip(V, V_old +- c).

    The critic may not move more than ``clip`` from its rollout values per update, pessimistically as in
    Vision-LLM-Alignment / DeepSpeed-Chat (0.5 * max(unclipped, clipped)). values, old_values, returns, mask:
    (batch, T). Returns scalars (loss, clip_fraction), the fraction of valid tokens where the clipped error was
    the larger (detached).
    """
    clipped_values = old_values + torch.clamp(values - old_values, -clip, clip)
    unclipped = (values - returns) ** 2
    clipped = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        clip_fraction = masked_mean((clipped > unclipped).to(values.dtype), mask)
    return loss, clip_fraction


def _kl_k1(logp: Tensor, ref_logp: Tensor) -> Tensor:
    return logp - ref_logp


def _kl_k2(logp: Tensor, ref_logp: Tensor) -> Tensor:
    return 0.5 * (logp - ref_logp) ** 2


def _kl_k3(logp: Tensor, ref_logp: Tensor) -> Tensor:
    r = ref_logp - logp
    return torch.expm1(r) - r  # expm1: exact near r = 0, where exp(r) - 1 would cancel


KL_ESTIMATORS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {"k1": _kl_k1, "k2": _kl_k2, "k3": _kl_k3}


def kl_penalty(logp: Tensor, ref_logp: Tensor, estimator: str = "k1") -> Tensor:
    """Per-token estimate of KL(pi || pi_ref) from tokens sampled from pi, with r = log pi_ref - log pi:

        k1 = -r                 unbiased, high variance, can be negative (InstructGPT, Vision-LLM-Alignment)
        k2 = 0.5 r^2            biased, low variance, >= 0
        k3 = exp(r) - 1 - r     unbiased, low variance, >= 0

    Schulman 2020, "Approximating KL Divergence", http://joschu.net/blog/kl-approx.html.
    logp, ref_logp: any shape, e.g. (batch, T). Returns the same shape. ``estimator``: a key of ``KL_ESTIMATORS``.
    """
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"estimator must be one of {sorted(KL_ESTIMATORS)}, got {estimator!r}")
    return KL_ESTIMATORS[estimator](logp, ref_logp)


def token_rewards(score: Tensor, logp: Tensor, ref_logp: Tensor, mask: Tensor, kl_coef: float,
                  estimator: str = "k1") -> tuple[Tensor, Tensor]:
    """Per-token PPO rewards: a KL penalty at every token plus the sequence score at the last one.

        r_t = -kl_coef * KL_t + [t == last valid token] * score

    InstructGPT (Ouyang et al. 2022, https://arxiv.org/abs/2203.02155); Vision-LLM-Alignment uses k1 and
    kl_coef 0.1. score: (batch,) (usually ``normalize_score``d); logp, ref_logp, mask: (batch, T).
    Returns (rewards, kl), each (batch, T), 0 at masked positions; rows without valid tokens get no score.
    """
    m = mask.bool()
    kl = torch.where(m, kl_penalty(logp, ref_logp, estimator), torch.zeros_like(logp))
    positions = torch.arange(m.shape[1], device=m.device)
    last = torch.where(m, positions, -1).amax(-1, keepdim=True)  # (batch, 1); -1 for an empty row
    at_last = positions == last  # (batch, T)
    rewards = -kl_coef * kl + at_last.to(kl.dtype) * score.to(kl.dtype).unsqueeze(-1)
    return rewards, kl


def normalize_score(score: Tensor, mean, std, scale: float = 1.0, clip: Optional[float] = None,
                    eps: float = 1e-8) -> Tensor:
    """z-normalise reward-model scores: ((score - mean) / (std + eps)) * scale, then clip to [-clip, clip].

    mean, std: floats or tensors broadcastable to ``score`` (batch,). Vision-LLM-Alignment takes them over a
    running window of the last 1000 scores, with scale 10 and clip 10.
    """
    out = (score - mean) / (std + eps) * scale
    if clip is not None:
        out = out.clamp(-clip, clip)
    return out


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy H = -sum_v p_v log p_v of the categorical distribution softmax(logits) (..., vocab) -> (...).

    Computed in float32 at least; tokens with probability 0 (logit -inf) contribute 0.
    """
    logits = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    logp = logits.log_softmax(-1)
    p = logp.exp()
    logp = torch.where(p > 0, logp, torch.zeros_like(logp))  # 0 * -inf would be NaN, forward and backward
    return -(p * logp).sum(-1)


__all__ = [
    "PREFERENCE_LOSSES", "RANKING_LOSSES", "KL_ESTIMATORS",
    "sigmoid_loss", "conservative_loss", "ipo_loss", "hinge_loss", "rpo_loss", "plackett_luce_dpo_loss",
    "dpo_rewards", "noisy_rejected_token_logps", "bradley_terry", "plackett_luce",
    "masked_sum", "masked_mean", "masked_var", "masked_whiten", "gae", "ppo_policy_loss", "ppo_value_loss",
    "kl_penalty", "token_rewards", "normalize_score", "entropy_from_logits",
]
