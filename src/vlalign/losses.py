"""Pure tensor functions for preference alignment: the DPO family, KTO, ranking losses and the pieces of PPO.

Nothing here holds state or configuration: a LightningModule gathers the tensors and calls these. Variants are
chosen by name from the tables ``PREFERENCE_LOSSES``, ``RANKING_LOSSES`` and ``KL_ESTIMATORS``; ``python -m
vlalign.losses`` prints the preference table (name, what it needs, parameters, paper) from this file.

**The preference-loss interface.** A preference loss returns one value per example, (batch,), and names what it
reads in its signature, from this vocabulary (candidates ranked best first, so column 0 is the chosen response):

    logratios     (batch, k)  log pi(y_i|x) - log pi_ref(y_i|x), summed over the response tokens (the module's
                              ``logp: mean`` averages them instead: length-normalised DPO, mllm-dpo's "use average")
    policy_logps  (batch, k)  log pi(y_i|x), summed over the response tokens (reference-free losses)
    ref_logps     (batch, k)  log pi_ref(y_i|x), summed
    lengths       (batch, k)  response lengths |y_i| in tokens
    chosen_nll    (batch,)    mean per-token negative log-likelihood of the chosen response under the policy
    mask          (batch, k)  bool, the candidates present in rows with fewer (optional)
    reward_mean   ()          running mean of the implicit rewards beta * logratios during training (optional)

and takes ``beta`` plus its own float parameters, with defaults, as keywords. A loss that reads ``logratios`` or
``ref_logps`` needs a reference model; one that reads neither is reference-free and the module skips the
reference pass. Pairwise losses need k == 2 and say so when given more. ``Objective`` picks a loss by name, or a
weighted sum of several (Mixed Preference Optimization), and routes the inputs and parameters to each.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor

# ------------------------------------------------------------------------------------------ preference (DPO)

INPUTS = {
    "logratios": "(batch, k) log pi(y|x) - log pi_ref(y|x)",
    "policy_logps": "(batch, k) log pi(y|x), summed",
    "ref_logps": "(batch, k) log pi_ref(y|x), summed",
    "lengths": "(batch, k) response lengths in tokens",
    "chosen_nll": "(batch,) mean per-token NLL of the chosen response",
    "mask": "(batch, k) candidates present",
    "reward_mean": "() running mean of beta * logratios",
}
REFERENCE_INPUTS = ("logratios", "ref_logps")


def _pair(x: Tensor, loss: str) -> tuple[Tensor, Tensor]:
    """The chosen and rejected columns (batch,) of a pairwise input (batch, 2)."""
    if x.dim() != 2 or x.shape[1] != 2:
        raise ValueError(f"the {loss!r} loss compares pairs: its inputs must be (batch, 2) with the chosen response "
                         f"in column 0, got shape {tuple(x.shape)}; use plackett_luce for k > 2 ranked candidates")
    return x[:, 0], x[:, 1]


def _margin(logratios: Tensor, loss: str) -> Tensor:
    """d = logratio_chosen - logratio_rejected (batch,)."""
    chosen, rejected = _pair(logratios, loss)
    return chosen - rejected


def _smoothed_logistic(z: Tensor, label_smoothing: float) -> Tensor:
    """-(1 - eps) log sigmoid(z) - eps log sigmoid(-z): the logistic loss with labels flipped at rate eps."""
    return -(1.0 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)


def dpo_rewards(logratios: Tensor, beta: float) -> Tensor:
    """DPO's implicit rewards r_i = beta * (log pi(y_i|x) - log pi_ref(y_i|x)), same shape as ``logratios``.

    Logged as rewards/chosen, rewards/rejected, rewards/margins (arXiv 2305.18290, section 5).
    """
    return beta * logratios


def sigmoid_loss(logratios: Tensor, beta: float) -> Tensor:
    """DPO: L = -log sigmoid(beta d), d = logratio_chosen - logratio_rejected.

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
    return _smoothed_logistic(beta * _margin(logratios, "conservative"), label_smoothing)


def robust_loss(logratios: Tensor, beta: float, label_smoothing: float = 0.1) -> Tensor:
    """Robust DPO: L = [(1 - eps) (-log sigmoid(beta d)) - eps (-log sigmoid(-beta d))] / (1 - 2 eps).

    Chowdhury et al. 2024, "Provably Robust DPO: Aligning Language Models with Noisy Feedback",
    https://arxiv.org/abs/2403.00409. An unbiased estimate of the clean-label loss when labels flip at rate
    eps = ``label_smoothing`` (< 0.5); eps = 0 is plain DPO. logratios: (batch, 2). Returns (batch,).
    """
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"robust DPO needs 0 <= label_smoothing < 0.5, got {label_smoothing}")
    z = beta * _margin(logratios, "robust")
    eps = label_smoothing
    return ((1.0 - eps) * -F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1.0 - 2.0 * eps)


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


def exo_pair_loss(logratios: Tensor, beta: float, label_smoothing: float = 1e-3) -> Tensor:
    """EXO (pairwise): the reverse KL from the model's pair preference sigmoid(beta d) to a smoothed label.

        p = sigmoid(beta d),   L = p (log p - log(1 - eps)) + (1 - p) (log(1 - p) - log eps),

    Ji et al. 2024, "Towards Efficient Exact Optimization of Language Model Alignment",
    https://arxiv.org/abs/2402.00856 (eq. 16, K = 2). eps = ``label_smoothing`` in (0, 1) (1e-3 as in TRL).
    logratios: (batch, 2). Returns (batch,); the minimum, 0, is at p = 1 - eps.
    """
    if not 0.0 < label_smoothing < 1.0:
        raise ValueError(f"exo_pair needs 0 < label_smoothing < 1, got {label_smoothing}")
    z = beta * _margin(logratios, "exo_pair")
    return (torch.sigmoid(z) * (F.logsigmoid(z) - math.log(1.0 - label_smoothing))
            + torch.sigmoid(-z) * (F.logsigmoid(-z) - math.log(label_smoothing)))


def nca_pair_loss(logratios: Tensor, beta: float) -> Tensor:
    """NCA (pairwise): L = -log sigmoid(r_w) - 1/2 log sigmoid(-r_w) - 1/2 log sigmoid(-r_l), r = beta * logratio.

    Chen et al. 2024, "Noise Contrastive Alignment of Language Models with Explicit Rewards",
    https://arxiv.org/abs/2402.05369. Each response's own reward is pushed (chosen up, both away from large
    values), not only their difference, so the chosen likelihood does not fall. logratios: (batch, 2). Returns (batch,).
    """
    chosen, rejected = _pair(beta * logratios, "nca_pair")
    return -F.logsigmoid(chosen) - 0.5 * F.logsigmoid(-chosen) - 0.5 * F.logsigmoid(-rejected)


def bco_pair_loss(logratios: Tensor, beta: float, reward_mean: Optional[Tensor] = None) -> Tensor:
    """BCO (pairwise): chosen vs rejected as a binary classifier whose logit is the shifted implicit reward.

        L = -log sigmoid(r_w - delta) - log sigmoid(-(r_l - delta)),    r = beta * logratio,

    Jung et al. 2024, "Binary Classifier Optimization for Large Language Model Alignment",
    https://arxiv.org/abs/2404.04656. delta, the reward shift, is ``reward_mean``: the running mean of the
    implicit rewards over training (the module keeps it; TRL's ``bco_pair`` does the same); without it, the mean of
    this batch's rewards. Used in Mixed Preference Optimization (InternVL). logratios: (batch, 2). Returns (batch,).
    """
    chosen, rejected = _pair(beta * logratios, "bco_pair")
    delta = torch.cat([chosen, rejected]).mean().detach() if reward_mean is None else reward_mean.detach()
    return -F.logsigmoid(chosen - delta) - F.logsigmoid(-(rejected - delta))


def sppo_hard_loss(logratios: Tensor, beta: float) -> Tensor:
    """SPPO with hard labels: L = (a - 1/(2 beta))^2 + (b + 1/(2 beta))^2, a, b the chosen / rejected logratios.

    Wu et al. 2024, "Self-Play Preference Optimization for Language Model Alignment",
    https://arxiv.org/abs/2405.00675 (Algorithm 1, eq. 4.7 with the win probability set to 1 and 0, as in TRL).
    Each log-ratio is regressed to its own target. logratios: (batch, 2). Returns (batch,).
    """
    a, b = _pair(logratios, "sppo_hard")
    return (a - 0.5 / beta) ** 2 + (b + 0.5 / beta) ** 2


def aot_pair_loss(logratios: Tensor, beta: float, label_smoothing: float = 0.0) -> Tensor:
    """AOT (paired): the sorted chosen log-ratios should dominate the sorted rejected ones, quantile by quantile.

        delta_(i) = sort(a)_i - sort(b)_i,
        L_i = -(1 - eps) log sigmoid(beta delta_(i)) - eps log sigmoid(-beta delta_(i)),

    Melnyk et al. 2024, "Distributional Preference Alignment of LLMs via Optimal Transport",
    https://arxiv.org/abs/2406.05882: the chosen rewards' distribution should dominate the rejected ones' across
    the batch (first-order stochastic dominance), compared quantile by quantile. a, b: the chosen / rejected
    logratios (batch,). Row i of the result belongs to the i-th quantile, not to example i: only its mean is
    meaningful. logratios: (batch, 2). Returns (batch,).
    """
    a, b = _pair(logratios, "aot_pair")
    delta = torch.sort(a).values - torch.sort(b).values
    return _smoothed_logistic(beta * delta, label_smoothing)


def aot_loss(policy_logps: Tensor, ref_logps: Tensor, beta: float, label_smoothing: float = 0.0) -> Tensor:
    """AOT: the sorted policy margins should dominate the sorted reference margins, quantile by quantile.

        m = log pi(y_w|x) - log pi(y_l|x),  m_ref = log pi_ref(y_w|x) - log pi_ref(y_l|x),
        delta_(i) = sort(m)_i - sort(m_ref)_i,
        L_i = -(1 - eps) log sigmoid(beta delta_(i)) - eps log sigmoid(-beta delta_(i)),

    Melnyk et al. 2024, https://arxiv.org/abs/2406.05882 (TRL's ``aot``): the distribution of the policy's margins
    should dominate the reference's. Row i belongs to the i-th quantile, not to example i.
    policy_logps, ref_logps: (batch, 2), summed. Returns (batch,).
    """
    pw, pl = _pair(policy_logps, "aot")
    rw, rl = _pair(ref_logps, "aot")
    delta = torch.sort(pw - pl).values - torch.sort(rw - rl).values
    return _smoothed_logistic(beta * delta, label_smoothing)


def apo_zero_loss(logratios: Tensor, beta: float) -> Tensor:
    """APO-zero: L = 1 - sigmoid(beta a) + sigmoid(beta b), a, b the chosen / rejected logratios.

    D'Oosterlinck et al. 2024, "Anchored Preference Optimization and Contrastive Revisions",
    https://arxiv.org/abs/2408.06266 (eq. 7): raises the chosen likelihood and lowers the rejected one, anchored
    at the reference. For chosen answers better than the model's own. logratios: (batch, 2). Returns (batch,).
    """
    a, b = _pair(beta * logratios, "apo_zero")
    return 1.0 - torch.sigmoid(a) + torch.sigmoid(b)


def apo_down_loss(logratios: Tensor, beta: float) -> Tensor:
    """APO-down: L = sigmoid(beta a) + 1 - sigmoid(beta (a - b)), a, b the chosen / rejected logratios.

    D'Oosterlinck et al. 2024, https://arxiv.org/abs/2408.06266 (eq. 8): lowers both likelihoods, the rejected
    more. For chosen answers worse than the model's own. Note that its gradient lowers the chosen log-ratio too
    (the margin still grows). logratios: (batch, 2). Returns (batch,).
    """
    a, b = _pair(beta * logratios, "apo_down")
    return torch.sigmoid(a) + 1.0 - torch.sigmoid(a - b)


def discopop_loss(logratios: Tensor, beta: float, tau: float = 0.05) -> Tensor:
    """DiscoPOP: a logistic loss below a zero margin blended into an exponential one above it (rho = beta d).

        L = (1 - sigmoid(rho / tau)) * (-log sigmoid(rho)) + sigmoid(rho / tau) * exp(-rho),

    Lu et al. 2024, "Discovering Preference Optimization Algorithms with and for Large Language Models",
    https://arxiv.org/abs/2406.08414 (eq. 5), tau = 0.05 as in the paper: logistic below a zero margin,
    exponential above. Not convex: within a few tau of rho = 0 the blend's slope is positive (a small margin is
    pushed back towards 0). logratios: (batch, 2). Returns (batch,).
    """
    rho = beta * _margin(logratios, "discopop")
    weight = torch.sigmoid(rho / tau)
    return (1.0 - weight) * -F.logsigmoid(rho) + weight * torch.exp(-rho)


def rpo_loss(logratios: Tensor, beta: float, chosen_nll: Tensor, alpha: float = 1.0) -> Tensor:
    """DPO plus a weighted NLL of the chosen response: L = -log sigmoid(beta d) + alpha * NLL(y_w).

    Pang et al. 2024, "Iterative Reasoning Preference Optimization", https://arxiv.org/abs/2404.19733; mllm-dpo's
    optional SFT weight. The NLL term keeps the chosen response likely while the margin grows (the same as the
    combination ``{sigmoid: 1, sft: alpha}``). logratios: (batch, 2). chosen_nll: (batch,). Returns (batch,).
    """
    return sigmoid_loss(logratios, beta) + alpha * chosen_nll


def sft_loss(chosen_nll: Tensor) -> Tensor:
    """SFT term: L = NLL(y_w), the mean per-token negative log-likelihood of the chosen response.

    The generation loss of Mixed Preference Optimization (Wang et al. 2024, https://arxiv.org/abs/2411.10442),
    meant for weighted combinations (``{sigmoid: 0.8, bco_pair: 0.2, sft: 1.0}``). Reference-free; any k.
    chosen_nll: (batch,). Returns (batch,).
    """
    return chosen_nll


def simpo_loss(policy_logps: Tensor, lengths: Tensor, beta: float, gamma: float = 0.5) -> Tensor:
    """SimPO: L = -log sigmoid(beta / |y_w| log pi(y_w|x) - beta / |y_l| log pi(y_l|x) - gamma). Reference-free.

    Meng et al. 2024, "SimPO: Simple Preference Optimization with a Reference-Free Reward",
    https://arxiv.org/abs/2405.14734: the length-normalised log-likelihood is the reward, gamma a target margin.
    The paper's beta is large (2 to 2.5) and gamma about 0.5 to 1.5; set ``beta`` accordingly.
    policy_logps, lengths: (batch, 2). Returns (batch,).
    """
    w, l = _pair(policy_logps / lengths.clamp(min=1), "simpo")
    return -F.logsigmoid(beta * (w - l) - gamma)


def cpo_loss(policy_logps: Tensor, chosen_nll: Tensor, beta: float, alpha: float = 1.0) -> Tensor:
    """CPO: L = -log sigmoid(beta log pi(y_w|x) - beta log pi(y_l|x)) + alpha * NLL(y_w). Reference-free.

    Xu et al. 2024, "Contrastive Preference Optimization: Pushing the Boundaries of LLM Performance in Machine
    Translation", https://arxiv.org/abs/2401.08417: DPO with a uniform reference, plus a behaviour-cloning NLL
    term on the chosen response. policy_logps: (batch, 2), summed; chosen_nll: (batch,). Returns (batch,).
    """
    w, l = _pair(policy_logps, "cpo")
    return -F.logsigmoid(beta * (w - l)) + alpha * chosen_nll


def _log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x < 0, accurate at both ends (Maechler 2012)."""
    x = x.clamp(max=-1e-6)  # a response of probability 1 has odds infinity: keep it finite
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def orpo_loss(policy_logps: Tensor, lengths: Tensor, chosen_nll: Tensor, beta: float) -> Tensor:
    """ORPO: L = NLL(y_w) - beta log sigmoid(log odds(y_w|x) - log odds(y_l|x)). Reference-free.

        odds(y|x) = P(y|x) / (1 - P(y|x)),   log P(y|x) = log pi(y|x) / |y|  (the per-token mean)

    Hong et al. 2024, "ORPO: Monolithic Preference Optimization without Reference Model",
    https://arxiv.org/abs/2403.07691; beta is the paper's lambda (0.1 in TRL). policy_logps, lengths: (batch, 2);
    chosen_nll: (batch,). Returns (batch,).
    """
    w, l = _pair(policy_logps / lengths.clamp(min=1), "orpo")
    log_odds = (w - _log1mexp(w)) - (l - _log1mexp(l))
    return chosen_nll - beta * F.logsigmoid(log_odds)


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
    "robust": robust_loss,
    "ipo": ipo_loss,
    "hinge": hinge_loss,
    "exo_pair": exo_pair_loss,
    "nca_pair": nca_pair_loss,
    "bco_pair": bco_pair_loss,
    "sppo_hard": sppo_hard_loss,
    "aot": aot_loss,
    "aot_pair": aot_pair_loss,
    "apo_zero": apo_zero_loss,
    "apo_down": apo_down_loss,
    "discopop": discopop_loss,
    "rpo": rpo_loss,
    "sft": sft_loss,
    "simpo": simpo_loss,
    "cpo": cpo_loss,
    "orpo": orpo_loss,
    "plackett_luce": plackett_luce_dpo_loss,
}


def loss_signature(name: str) -> tuple[set[str], dict[str, float]]:
    """(tensor inputs it reads, its float parameters with defaults) of ``PREFERENCE_LOSSES[name]``; ``beta`` is
    neither (the module's own setting)."""
    if name not in PREFERENCE_LOSSES:
        raise ValueError(f"unknown preference loss {name!r}: one of {sorted(PREFERENCE_LOSSES)}")
    inputs, params = set(), {}
    for p in inspect.signature(PREFERENCE_LOSSES[name]).parameters.values():
        if p.name in INPUTS:
            inputs.add(p.name)
        elif p.name != "beta":
            params[p.name] = p.default
    return inputs, params


def needs_reference(name: str) -> bool:
    """True when the loss reads the reference model's log-probs (``logratios`` or ``ref_logps``)."""
    return bool(loss_signature(name)[0] & set(REFERENCE_INPUTS))


@dataclass
class Objective:
    """A preference loss by name, or a weighted sum of several, with its parameters routed by name.

        L = sum_j w_j * L_j(inputs, beta, params_j)            (batch,)

    terms: ``{name: weight}`` (a single name means weight 1). params: float parameters; each is passed to every
    term that declares it (``label_smoothing`` to both ``conservative`` and ``aot``), and must be declared by one.
    E.g. Mixed Preference Optimization (InternVL): ``{"sigmoid": 0.8, "bco_pair": 0.2, "sft": 1.0}``.
    """

    terms: dict[str, float]
    params: dict[str, float] = field(default_factory=dict)

    @classmethod
    def parse(cls, loss: Union[str, dict[str, float]], params: Optional[dict] = None) -> "Objective":
        terms = {loss: 1.0} if isinstance(loss, str) else {str(k): float(v) for k, v in dict(loss).items()}
        return cls(terms, dict(params or {}))

    def __post_init__(self):
        if not self.terms:
            raise ValueError("the loss needs at least one term")
        declared = set()
        for name in self.terms:
            declared |= set(loss_signature(name)[1])
        unknown = set(self.params) - declared
        if "beta" in unknown:
            raise ValueError("beta is the module's own setting (model.init_args.beta), not a loss parameter")
        if unknown:
            raise ValueError(f"loss_params {sorted(unknown)} are not parameters of {sorted(self.terms)} (theirs: "
                             f"{sorted(declared) or 'none'})")

    @property
    def inputs(self) -> set[str]:
        """Every tensor input some term reads."""
        return set().union(*(loss_signature(n)[0] for n in self.terms))

    @property
    def needs_reference(self) -> bool:
        return any(needs_reference(n) for n in self.terms)

    def __call__(self, beta: float, **inputs: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """(total loss (batch,), each term's unweighted loss (batch,)) from the available ``inputs``."""
        total, parts = 0.0, {}
        for name, weight in self.terms.items():
            fn = PREFERENCE_LOSSES[name]
            wanted, defaults = loss_signature(name)
            missing = {n for n in wanted if n not in inputs
                       and inspect.signature(fn).parameters[n].default is inspect.Parameter.empty}
            if missing:
                raise ValueError(f"the {name!r} loss reads {sorted(missing)}, which this module does not provide")
            kwargs = {n: inputs[n] for n in wanted if n in inputs}
            kwargs.update({k: v for k, v in self.params.items() if k in defaults})
            if "beta" in inspect.signature(fn).parameters:
                kwargs["beta"] = beta
            parts[name] = fn(**kwargs)
            total = total + weight * parts[name]
        return total, parts


def describe_losses() -> str:
    """The preference-loss table as markdown (README section "Preference losses")."""
    import re

    rows = ["| name | reference | reads | parameters (defaults) | what it is | paper |", "|---|---|---|---|---|---|"]
    for name, fn in PREFERENCE_LOSSES.items():
        inputs, params = loss_signature(name)
        ref = "needed" if needs_reference(name) else "none"
        reads = ", ".join(f"`{i}`" for i in INPUTS if i in inputs)
        ps = ", ".join(f"`{k}` {v}" for k, v in params.items()) or "-"
        doc = inspect.getdoc(fn)
        summary = doc.split("\n")[0].replace("|", "\\|")
        link = re.search(r"https://arxiv\.org/abs/[0-9.]+[0-9]", doc)
        paper = f"[arXiv {link.group(0).rsplit('/', 1)[1]}]({link.group(0)})" if link else "-"
        rows.append(f"| `{name}` | {ref} | {reads} | {ps} | {summary} | {paper} |")
    return "\n".join(rows)


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


# ------------------------------------------------------------------------------------------ unpaired (KTO)


def kto_loss(logratios: Tensor, desirable: Tensor, reference_point: Tensor, beta: float,
             desirable_weight: float = 1.0, undesirable_weight: float = 1.0) -> Tensor:
    """KTO on unpaired examples, each a response marked desirable or undesirable:

        r = logratio = log pi(y|x) - log pi_ref(y|x),    z0 = reference_point (no gradient)
        L = lambda_D (1 - sigmoid(beta (r - z0)))   for a desirable y
            lambda_U (1 - sigmoid(beta (z0 - r)))   for an undesirable y

    Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization",
    https://arxiv.org/abs/2402.01306. z0 estimates KL(pi || pi_ref) from the batch (``kto_reference_point``).
    logratios: (batch,) summed; desirable: (batch,) bool. Returns (batch,).
    """
    z0 = reference_point.detach()
    gain = desirable_weight * (1.0 - torch.sigmoid(beta * (logratios - z0)))
    loss = undesirable_weight * (1.0 - torch.sigmoid(beta * (z0 - logratios)))
    return torch.where(desirable.bool(), gain, loss)


def kto_reference_point(mismatched_logratios: Tensor) -> Tensor:
    """KTO's z0 = max(0, mean_i [log pi(y'_i|x_i) - log pi_ref(y'_i|x_i)]): a batch estimate of KL(pi || pi_ref)
    from responses y'_i that belong to other prompts of the batch (so they are off-policy for x_i), clamped at 0
    and detached. mismatched_logratios: (n,) (gather them from every rank first). Returns a scalar."""
    return mismatched_logratios.detach().mean().clamp(min=0)


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
    "PREFERENCE_LOSSES", "RANKING_LOSSES", "KL_ESTIMATORS", "INPUTS", "Objective", "loss_signature", "needs_reference",
    "describe_losses", "dpo_rewards", "noisy_rejected_token_logps", "kto_loss", "kto_reference_point",
    *(fn.__name__ for fn in PREFERENCE_LOSSES.values()),
    "bradley_terry", "plackett_luce", "masked_sum", "masked_mean", "masked_var", "masked_whiten", "gae",
    "ppo_policy_loss", "ppo_value_loss", "kl_penalty", "token_rewards", "normalize_score", "entropy_from_logits",
]


def _main(argv=None):
    """``python -m vlalign.losses``: print the preference-loss table; ``--readme README.md`` rewrites its section."""
    import argparse

    parser = argparse.ArgumentParser(description=_main.__doc__)
    parser.add_argument("--readme", help="a markdown file whose <!-- losses:begin --> ... <!-- losses:end --> "
                                         "section is replaced by the table")
    args = parser.parse_args(argv)
    table = describe_losses()
    if not args.readme:
        print(table)
        return
    text = open(args.readme, encoding="utf-8").read()
    begin, end = "<!-- losses:begin -->", "<!-- losses:end -->"
    if begin not in text or end not in text:
        raise SystemExit(f"{args.readme} has no {begin} ... {end} section")
    head, rest = text.split(begin, 1)
    tail = rest.split(end, 1)[1]
    with open(args.readme, "w", encoding="utf-8") as f:
        f.write(f"{head}{begin}\n{table}\n{end}{tail}")
    print(f"updated the loss table in {args.readme}")


if __name__ == "__main__":
    _main()
