"""Hand-derived checks of the pure loss functions in ``vlalign.losses``: every expected value is worked out here
with ``math``, never by calling the function under test another way.

    python -m pytest tests/test_losses.py -q
"""

import inspect
import math

import pytest
import torch

from vlalign.losses import (KL_ESTIMATORS, PREFERENCE_LOSSES, RANKING_LOSSES, bradley_terry, dpo_rewards,
                            entropy_from_logits, gae, kl_penalty, masked_mean, masked_sum, masked_var, masked_whiten,
                            noisy_rejected_token_logps, normalize_score, plackett_luce, ppo_policy_loss,
                            ppo_value_loss, token_rewards)

PAIRWISE = ("sigmoid", "conservative", "ipo", "hinge", "rpo")
# Keyword parameters each loss needs to be called at all (rpo's NLL term is required).
PARAMS = {"conservative": {"label_smoothing": 0.2}, "rpo": {"chosen_nll": torch.tensor([1.2]), "alpha": 0.5}}


def close(actual, expected, tol=1e-6):
    torch.testing.assert_close(torch.as_tensor(actual, dtype=torch.float64),
                               torch.as_tensor(expected, dtype=torch.float64), atol=tol, rtol=tol)


def lr(chosen, *others, grad=False):
    return torch.tensor([[chosen, *others]], dtype=torch.float64, requires_grad=grad)


# ---------------------------------------------------------------------------------------------- preference

def test_table_holds_every_loss():
    assert set(PREFERENCE_LOSSES) == {*PAIRWISE, "plackett_luce"}
    assert set(RANKING_LOSSES) == {"bradley_terry", "plackett_luce"}
    assert set(KL_ESTIMATORS) == {"k1", "k2", "k3"}


def test_signatures_tell_the_caller_what_a_loss_needs():
    needs_nll = {n for n, f in PREFERENCE_LOSSES.items() if "chosen_nll" in inspect.signature(f).parameters}
    assert needs_nll == {"rpo"}
    assert inspect.signature(PREFERENCE_LOSSES["conservative"]).parameters["label_smoothing"].default == 0.0
    assert inspect.signature(PREFERENCE_LOSSES["rpo"]).parameters["alpha"].default == 1.0


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_dpo_is_log2_when_policy_equals_reference(beta):
    zero = torch.zeros(3, 2)
    close(PREFERENCE_LOSSES["sigmoid"](zero, beta), [math.log(2)] * 3)
    close(PREFERENCE_LOSSES["conservative"](zero, beta, label_smoothing=0.3), [math.log(2)] * 3)
    close(PREFERENCE_LOSSES["plackett_luce"](zero, beta), [math.log(2)] * 3)
    close(PREFERENCE_LOSSES["hinge"](zero, beta), [1.0] * 3)
    close(PREFERENCE_LOSSES["ipo"](zero, beta), [(1 / (2 * beta)) ** 2] * 3)


def test_pairwise_losses_at_a_point():
    beta, x = 0.1, lr(0.3, -0.2)  # d = 0.5, beta d = 0.05
    z = 0.05
    dpo = math.log(1 + math.exp(-z))  # -log sigmoid(z)
    close(PREFERENCE_LOSSES["sigmoid"](x, beta), [dpo])
    close(PREFERENCE_LOSSES["conservative"](x, beta, label_smoothing=0.2),
          [0.8 * math.log(1 + math.exp(-z)) + 0.2 * math.log(1 + math.exp(z))])
    close(PREFERENCE_LOSSES["conservative"](x, beta), [dpo])  # eps = 0 is DPO
    close(PREFERENCE_LOSSES["ipo"](x, beta), [(0.5 - 1 / (2 * 0.1)) ** 2])  # (0.5 - 5)^2 = 20.25
    close(PREFERENCE_LOSSES["hinge"](x, beta), [1 - 0.05])
    close(PREFERENCE_LOSSES["hinge"](lr(1.0, -1.0), 1.0), [0.0])  # margin past 1: no loss
    close(PREFERENCE_LOSSES["rpo"](x, beta, chosen_nll=torch.tensor([1.2], dtype=torch.float64), alpha=0.5),
          [dpo + 0.5 * 1.2])
    close(PREFERENCE_LOSSES["plackett_luce"](x, beta), [dpo])


def test_dpo_rewards():
    close(dpo_rewards(lr(0.3, -0.2), 0.1), [[0.03, -0.02]])


@pytest.mark.parametrize("name", sorted(PREFERENCE_LOSSES))
def test_gradient_pushes_chosen_up_and_rejected_down(name):
    x = lr(0.3, -0.2, grad=True)  # inside every loss's active region (hinge: beta d < 1; ipo: d < 1/(2 beta))
    params = {k: (v.double() if torch.is_tensor(v) else v) for k, v in PARAMS.get(name, {}).items()}
    PREFERENCE_LOSSES[name](x, 0.1, **params).sum().backward()
    assert x.grad[0, 0] < 0 < x.grad[0, 1]


@pytest.mark.parametrize("name", PAIRWISE)
def test_pairwise_losses_reject_lists(name):
    with pytest.raises(ValueError, match="pairs"):
        PREFERENCE_LOSSES[name](torch.zeros(2, 3), 0.1, **PARAMS.get(name, {}))


def test_plackett_luce_dpo_k3_by_hand():
    beta, x = 0.5, lr(2.0, 1.0, -2.0, grad=True)  # beta * lr = 1.0, 0.5, -1.0
    a, b, c = 1.0, 0.5, -1.0
    expected = -((a - math.log(math.exp(a) + math.exp(b) + math.exp(c))) + (b - math.log(math.exp(b) + math.exp(c))))
    loss = PREFERENCE_LOSSES["plackett_luce"](x, beta)
    close(loss, [expected])
    loss.sum().backward()
    assert x.grad[0, 0] < 0 < x.grad[0, 2]


# ---------------------------------------------------------------------------------------------- SIMA/POVID

def test_noisy_rejected_token_logps_by_hand():
    logits = torch.tensor([[[2.0, 1.0, 0.0, -1.0],   # top-1 = 0 = label -> top-2 (token 1)
                            [0.0, 3.0, 1.0, 0.5],    # top-1 = 1 != label 2 -> top-1 (token 1)
                            [5.0, 0.0, 0.0, 0.0]]])  # label -100 -> 0
    labels = torch.tensor([[0, 2, -100]])

    def logsumexp(*v):
        return math.log(sum(math.exp(u) for u in v))

    expected = [[1.0 - logsumexp(2, 1, 0, -1), 3.0 - logsumexp(0, 3, 1, 0.5), 0.0]]
    out = noisy_rejected_token_logps(logits, labels)
    assert out.shape == (1, 3) and out.dtype == torch.float32
    close(out, expected)


# ---------------------------------------------------------------------------------------------- ranking

def test_bradley_terry_by_hand():
    close(bradley_terry(torch.tensor([1.0, 0.0]), torch.tensor([0.2, 0.0])),
          [math.log(1 + math.exp(-0.8)), math.log(2)])
    scores = torch.tensor([[1.0, 0.2]])
    close(RANKING_LOSSES["bradley_terry"](scores), [math.log(1 + math.exp(-0.8))])
    with pytest.raises(ValueError, match="pairs"):
        RANKING_LOSSES["bradley_terry"](torch.zeros(1, 3))


def test_plackett_luce_equals_bradley_terry_for_pairs():
    scores = torch.tensor([[1.0, 0.2], [-0.5, 0.7], [3.0, 3.0]])
    close(plackett_luce(scores), bradley_terry(scores[:, 0], scores[:, 1]))
    close(RANKING_LOSSES["plackett_luce"](scores), RANKING_LOSSES["bradley_terry"](scores))


def test_plackett_luce_k3_by_hand():
    s = [1.0, 0.5, -1.0]
    expected = -((s[0] - math.log(sum(math.exp(v) for v in s))) + (s[1] - math.log(math.exp(s[1]) + math.exp(s[2]))))
    close(plackett_luce(torch.tensor([s])), [expected])


def test_plackett_luce_mask_equals_dropping_and_has_finite_gradients():
    scores = torch.tensor([[1.0, 0.5, -1.0, float("nan")],   # trailing pad holding garbage
                           [0.3, 2.0, 0.0, 0.0],
                           [0.7, 1e4, -0.4, 0.0],            # a hole in the middle
                           [0.5, 0.0, 0.0, 0.0]], requires_grad=True)  # a single candidate
    mask = torch.tensor([[True, True, True, False],
                         [True, True, True, True],
                         [True, False, True, False],
                         [True, False, False, False]])
    loss = plackett_luce(scores, mask)
    close(loss[0], plackett_luce(torch.tensor([[1.0, 0.5, -1.0]]))[0])
    close(loss[1], plackett_luce(torch.tensor([[0.3, 2.0, 0.0, 0.0]]))[0])
    close(loss[2], plackett_luce(torch.tensor([[0.7, -0.4]]))[0])
    close(loss[3], 0.0)
    loss.sum().backward()
    assert torch.isfinite(scores.grad).all()
    assert (scores.grad[~mask] == 0).all()
    # PL DPO forwards its mask the same way
    close(PREFERENCE_LOSSES["plackett_luce"](scores.detach()[:1], 1.0, mask=mask[:1]), loss[:1].detach())


def test_bradley_terry_table_entry_skips_incomplete_rows():
    scores = torch.tensor([[1.0, 0.2], [0.0, 5.0]])
    close(RANKING_LOSSES["bradley_terry"](scores, torch.tensor([[True, True], [True, False]])),
          [math.log(1 + math.exp(-0.8)), 0.0])


# ---------------------------------------------------------------------------------------------- masked statistics

def test_masked_statistics_by_hand():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, float("inf")]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])  # entries 1, 2, 4
    close(masked_sum(x, mask), 7.0)
    close(masked_mean(x, mask), 7 / 3)
    close(masked_mean(x, mask, dim=1), [1.5, 4.0])
    dev2 = (1 - 7 / 3) ** 2 + (2 - 7 / 3) ** 2 + (4 - 7 / 3) ** 2  # = 14/3
    close(masked_var(x, mask), dev2 / 2)
    close(masked_var(x, mask, unbiased=False), dev2 / 3)
    close(masked_mean(x, torch.zeros_like(mask)), 0.0)


def test_masked_whiten():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, 5.0, -7.0, 0.0]])
    mask = torch.tensor([[True, True, True, False], [True, True, False, False]])  # 1..5: mean 3, variance 2
    out = masked_whiten(x, mask)
    close(out[mask], [(v - 3) / math.sqrt(2) for v in (1, 2, 3, 4, 5)], tol=1e-5)
    assert (out[~mask] == 0).all()  # documented: masked-out entries become 0
    close(masked_mean(out, mask), 0.0, tol=1e-6)
    close(masked_var(out, mask, unbiased=False), 1.0, tol=1e-5)
    close(masked_whiten(x, mask, shift_mean=False)[mask], [(v - 3) / math.sqrt(2) + 3 for v in (1, 2, 3, 4, 5)],
          tol=1e-5)


# ---------------------------------------------------------------------------------------------- PPO

def _gae_by_hand(r, v, gamma, lam):
    d0 = r[0] + gamma * v[1] - v[0]
    d1 = r[1] + gamma * v[2] - v[1]
    d2 = r[2] + gamma * 0.0 - v[2]  # the episode ends after the last token
    gl = gamma * lam
    return [d0 + gl * d1 + gl ** 2 * d2, d1 + gl * d2, d2]


def test_gae_closed_form():
    gamma, lam = 0.9, 0.8
    r, v = [0.1, -0.2, 1.0], [0.5, 0.4, 0.3]
    adv, ret = gae(torch.tensor([r]), torch.tensor([v]), torch.ones(1, 3), gamma, lam)
    expected = _gae_by_hand(r, v, gamma, lam)  # [0.08528, 0.174, 0.7]
    close(adv, [expected])
    close(ret, [[a + b for a, b in zip(expected, v)]])


def test_gae_right_padded_rows():
    gamma, lam = 0.9, 0.8
    r, v = [0.1, -0.2, 1.0], [0.5, 0.4, 0.3]
    rewards = torch.tensor([r + [7.0, 7.0], [0.5, 1.0, 2.0, 3.0, 4.0]])
    values = torch.tensor([v + [9.0, 9.0], [1.0, 1.0, 1.0, 1.0, 1.0]])
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 0, 0, 0, 0]])
    adv, ret = gae(rewards, values, mask, gamma, lam)
    expected = _gae_by_hand(r, v, gamma, lam)
    close(adv[0], expected + [0.0, 0.0])
    close(ret[0], [a + b for a, b in zip(expected, v)] + [0.0, 0.0])
    close(adv[1], [0.5 - 1.0, 0, 0, 0, 0])  # one token: delta = r - V, next value 0
    close(ret[1], [0.5, 0, 0, 0, 0])


def test_ppo_policy_loss_clipped_and_not():
    clip = 0.2
    ratio = [1.5, 0.9, 0.5, 1.5, 3.0]
    adv = [1.0, 2.0, -1.0, -1.0, 5.0]
    logp = torch.tensor([[math.log(q) for q in ratio]], dtype=torch.float64, requires_grad=True)
    old = torch.zeros(1, 5, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1, 0]])  # the last token is padding
    loss, clip_frac, approx_kl = ppo_policy_loss(logp, old, torch.tensor([adv], dtype=torch.float64), mask, clip)
    # per token max(-A r, -A clip(r)):
    # t0: max(-1.5, -1.2) = -1.2 clipped; t1: max(-1.8, -1.8) = -1.8; t2: max(0.5, 0.8) = 0.8 clipped;
    # t3: max(1.5, 1.2) = 1.5 (pessimistic: the unclipped term wins)
    close(loss, (-1.2 - 1.8 + 0.8 + 1.5) / 4)
    close(clip_frac, 2 / 4)
    close(approx_kl, sum(0.5 * math.log(q) ** 2 for q in ratio[:4]) / 4)
    loss.backward()
    # d/dlogp (-A r) = -A r, over 4 valid tokens; clipped tokens and padding get no gradient
    close(logp.grad, [[0.0, -2.0 * 0.9 / 4, 0.0, 1.0 * 1.5 / 4, 0.0]])


def test_ppo_policy_loss_on_policy():
    adv = torch.tensor([[1.0, -3.0, 0.5]])
    loss, clip_frac, approx_kl = ppo_policy_loss(torch.zeros(1, 3), torch.zeros(1, 3), adv, torch.ones(1, 3), 0.2)
    close(loss, -(1.0 - 3.0 + 0.5) / 3)
    close(clip_frac, 0.0)
    close(approx_kl, 0.0)


def test_ppo_value_loss_clipped_and_not():
    values = torch.tensor([[0.5, 0.1, -0.5, 4.0]])
    old = torch.zeros(1, 4)
    returns = torch.tensor([[1.0, 1.0, 0.0, -4.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    loss, clip_frac = ppo_value_loss(values, old, returns, mask, 0.2)
    # t0: v 0.5 -> clipped 0.2: max(0.25, 0.64) = 0.64 (clipped wins)
    # t1: v 0.1 inside the clip: 0.81 both
    # t2: v -0.5 -> clipped -0.2: max(0.25, 0.04) = 0.25 (unclipped wins)
    close(loss, 0.5 * (0.64 + 0.81 + 0.25) / 3)
    close(clip_frac, 1 / 3)


def test_kl_estimators_at_a_point():
    logp, ref = torch.tensor([-1.0]), torch.tensor([-1.5])
    r = -1.5 - -1.0
    close(kl_penalty(logp, ref), [0.5])
    close(kl_penalty(logp, ref, "k1"), [-r])
    close(kl_penalty(logp, ref, "k2"), [0.5 * r ** 2])
    close(kl_penalty(logp, ref, "k3"), [math.exp(r) - 1 - r])
    with pytest.raises(ValueError, match="k1"):
        kl_penalty(logp, ref, "k4")


def test_token_rewards_put_the_score_at_the_last_valid_token():
    score = torch.tensor([2.0, -1.0, 5.0])
    logp = torch.tensor([[-1.0, -2.0, -0.5, -9.0], [-1.0, -9.0, -9.0, -9.0], [0.0, 0.0, 0.0, 0.0]])
    ref = torch.tensor([[-1.5, -1.0, -0.5, 0.0], [-0.5, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]])
    rewards, kl = token_rewards(score, logp, ref, mask, kl_coef=0.1)
    close(kl, [[0.5, -1.0, 0.0, 0.0], [-0.5, 0, 0, 0], [0, 0, 0, 0]])
    close(rewards, [[-0.05, 0.1, 0.0 + 2.0, 0.0], [0.05 - 1.0, 0, 0, 0], [0, 0, 0, 0]])
    rewards, kl = token_rewards(score, logp, ref, mask, kl_coef=0.1, estimator="k2")
    close(kl[0], [0.125, 0.5, 0.0, 0.0])


def test_normalize_score():
    score = torch.tensor([0.0, 10.0, 30.0])
    close(normalize_score(score, 10.0, 5.0, scale=10.0), [-20.0, 0.0, 40.0], tol=1e-5)
    close(normalize_score(score, 10.0, 5.0, scale=10.0, clip=10.0), [-10.0, 0.0, 10.0])


def test_entropy_from_logits():
    close(entropy_from_logits(torch.zeros(2, 4)), [math.log(4)] * 2)
    logits = torch.tensor([[0.0, 0.0, float("-inf")]], requires_grad=True)
    h = entropy_from_logits(logits)
    close(h, [math.log(2)])
    h.sum().backward()
    assert torch.isfinite(logits.grad).all()
    assert entropy_from_logits(torch.zeros(3, 5, dtype=torch.bfloat16)).dtype == torch.float32
