"""Hand-derived checks of the pure loss functions in ``vlalign.losses``: every expected value is worked out here
with ``math``, never by calling the function under test another way. The preference-loss table is checked by
properties every entry must have (read from the table, so a new loss is checked without editing this file) and
each loss by its value at a hand-computed point.

    python -m pytest tests/test_losses.py -q
"""

import math

import pytest
import torch

from vlalign.losses import (INPUTS, KL_ESTIMATORS, PREFERENCE_LOSSES, RANKING_LOSSES, Objective, bradley_terry,
                            dpo_rewards, entropy_from_logits, gae, kl_penalty, kto_loss, kto_reference_point,
                            loss_signature, masked_mean, masked_sum, masked_var, masked_whiten, needs_reference,
                            noisy_rejected_token_logps, normalize_score, plackett_luce, ppo_policy_loss,
                            ppo_value_loss, token_rewards)


def close(actual, expected, tol=1e-6):
    torch.testing.assert_close(torch.as_tensor(actual, dtype=torch.float64),
                               torch.as_tensor(expected, dtype=torch.float64), atol=tol, rtol=tol)


def lr(chosen, *others, grad=False):
    return torch.tensor([[chosen, *others]], dtype=torch.float64, requires_grad=grad)


def softplus(x):
    """log(1 + e^x) = -log sigmoid(-x)."""
    return math.log1p(math.exp(x))


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


def call(name, beta=0.1, **inputs):
    """One loss through the same routing the modules use."""
    return Objective.parse(name)(beta, **inputs)[0]


# ---------------------------------------------------------------------------------------------- every entry

def _inputs(policy, ref, lengths):
    """The interface's inputs from policy / reference summed log-probs and lengths (batch, k), with the graph."""
    return {"logratios": policy - ref, "policy_logps": policy, "ref_logps": ref, "lengths": lengths,
            "chosen_nll": -policy[:, 0] / lengths[:, 0]}


# logratios (2, -2), (1.5, -2.5), (-2, 2): beta d = +-0.4 with beta 0.1, inside every loss's active region (hinge:
# beta d < 1; ipo: d < 1 / (2 beta); sppo_hard: |a|, |b| < 1 / (2 beta)) and away from the zero margin around which
# DiscoPOP's blend is not monotone
POLICY = [[-6.0, -8.0], [-5.0, -9.0], [-7.0, -7.5]]
REF = [[-8.0, -6.0], [-6.5, -6.5], [-5.0, -9.5]]
LENGTHS = [[3.0, 4.0], [2.0, 5.0], [4.0, 4.0]]


def test_every_loss_reads_only_the_interface_and_documents_itself():
    for name, fn in PREFERENCE_LOSSES.items():
        inputs, params = loss_signature(name)
        assert inputs and inputs <= set(INPUTS), name
        assert all(isinstance(v, (int, float)) for v in params.values()), (name, params)  # all have defaults
        doc = fn.__doc__ or ""
        assert "arxiv.org" in doc or "Mitchell 2023" in doc, f"{name}: cite the paper"
        assert "Returns (batch,)" in doc, f"{name}: give the shapes"


@pytest.mark.parametrize("name", list(PREFERENCE_LOSSES))
def test_shape_and_finite(name):
    out = call(name, **_inputs(torch.tensor(POLICY), torch.tensor(REF), torch.tensor(LENGTHS)))
    assert out.shape == (3,) and torch.isfinite(out).all()


@pytest.mark.parametrize("name", list(PREFERENCE_LOSSES))
def test_tied_responses_give_one_value_whatever_the_likelihood(name):
    """At policy == reference with chosen and rejected alike (same length, same log-prob), every row has the same
    loss: a loss depends on what tells the responses apart, not on how likely the pair is overall."""
    lengths = torch.tensor([[2.0, 2.0], [5.0, 5.0], [3.0, 3.0]])
    policy = -2.0 * lengths  # the same per-token log-prob in every row, different totals
    out = call(name, **_inputs(policy, policy.clone(), lengths))
    close(out, out[0].expand(3))


@pytest.mark.parametrize("name", list(PREFERENCE_LOSSES))
def test_gradient_widens_the_margin(name):
    """Raising the chosen log-prob and lowering the rejected one by the same amount lowers every loss
    (apo_down lowers both likelihoods, so only this direction, not each sign, is common to the family)."""
    policy = torch.tensor(POLICY, dtype=torch.float64, requires_grad=True)
    call(name, **_inputs(policy, torch.tensor(REF, dtype=torch.float64),
                         torch.tensor(LENGTHS, dtype=torch.float64))).sum().backward()
    assert (policy.grad[:, 0] - policy.grad[:, 1] < 0).all(), policy.grad


@pytest.mark.parametrize("name", list(PREFERENCE_LOSSES))
def test_lists_are_ranked_or_refused(name):
    """k = 3 candidates: a listwise loss gives (batch,), a pairwise one refuses in words."""
    three = torch.tensor([[-6.0, -8.0, -9.0]])
    inputs = _inputs(three, three - 0.1, torch.tensor([[3.0, 4.0, 5.0]]))
    try:
        out = call(name, **inputs)
    except ValueError as e:
        assert "pairs" in str(e)
    else:
        assert out.shape == (1,)


def test_reference_is_declared_by_what_a_loss_reads():
    free = {n for n in PREFERENCE_LOSSES if not needs_reference(n)}
    assert {"simpo", "cpo", "orpo", "sft"} <= free
    assert not free & {"sigmoid", "ipo", "robust", "bco_pair", "aot", "plackett_luce"}
    for n in free:
        assert not loss_signature(n)[0] & {"logratios", "ref_logps"}


# ---------------------------------------------------------------------------------------------- each at a point
# beta 0.1 and logratios (0.3, -0.2): a = 0.3, b = -0.2, d = 0.5, beta d = 0.05

@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_dpo_is_log2_when_policy_equals_reference(beta):
    zero = torch.zeros(3, 2)
    close(call("sigmoid", beta, logratios=zero), [math.log(2)] * 3)
    close(call("conservative", beta, logratios=zero), [math.log(2)] * 3)
    close(call("robust", beta, logratios=zero), [math.log(2)] * 3)  # (0.9 - 0.1) log 2 / 0.8
    close(call("plackett_luce", beta, logratios=zero), [math.log(2)] * 3)
    close(call("hinge", beta, logratios=zero), [1.0] * 3)
    close(call("ipo", beta, logratios=zero), [(1 / (2 * beta)) ** 2] * 3)
    close(call("apo_zero", beta, logratios=zero), [1.0] * 3)  # 1 - 1/2 + 1/2
    close(call("discopop", beta, logratios=zero), [0.5 * math.log(2) + 0.5] * 3)


def test_classic_pairwise_losses_at_a_point():
    x, z = lr(0.3, -0.2), 0.05
    dpo = softplus(-z)
    close(call("sigmoid", logratios=x), [dpo])
    close(PREFERENCE_LOSSES["conservative"](x, 0.1, label_smoothing=0.2), [0.8 * softplus(-z) + 0.2 * softplus(z)])
    close(call("conservative", logratios=x), [dpo])  # eps = 0 is DPO
    close(call("ipo", logratios=x), [(0.5 - 1 / (2 * 0.1)) ** 2])  # (0.5 - 5)^2 = 20.25
    close(call("hinge", logratios=x), [1 - 0.05])
    close(call("hinge", 1.0, logratios=lr(1.0, -1.0)), [0.0])  # margin past 1: no loss
    nll = torch.tensor([1.2], dtype=torch.float64)
    close(PREFERENCE_LOSSES["rpo"](x, 0.1, chosen_nll=nll, alpha=0.5), [dpo + 0.5 * 1.2])
    close(call("plackett_luce", logratios=x), [dpo])
    close(call("sft", chosen_nll=nll), [1.2])


def test_robust_dpo_at_a_point():
    z, eps = 0.05, 0.1
    close(call("robust", logratios=lr(0.3, -0.2)), [((1 - eps) * softplus(-z) - eps * softplus(z)) / (1 - 2 * eps)])
    with pytest.raises(ValueError, match="0.5"):
        PREFERENCE_LOSSES["robust"](lr(0.3, -0.2), 0.1, label_smoothing=0.5)


def test_exo_pair_at_a_point():
    p, eps = sigmoid(0.05), 1e-3
    close(call("exo_pair", logratios=lr(0.3, -0.2)),
          [p * (math.log(p) - math.log(1 - eps)) + (1 - p) * (math.log(1 - p) - math.log(eps))])
    # the minimum: the model's preference probability equals the smoothed label
    z_star = math.log((1 - eps) / eps)
    close(call("exo_pair", 1.0, logratios=lr(z_star, 0.0)), [0.0], tol=1e-9)


def test_nca_pair_at_a_point():
    rw, rl = 0.03, -0.02
    close(call("nca_pair", logratios=lr(0.3, -0.2)), [softplus(-rw) + 0.5 * softplus(rw) + 0.5 * softplus(rl)])


def test_bco_pair_at_a_point():
    x = lr(0.3, -0.2)  # rewards 0.03, -0.02
    delta = (0.03 - 0.02) / 2  # without a running mean: this batch's mean reward, 0.005
    close(call("bco_pair", logratios=x), [softplus(-(0.03 - delta)) + softplus(-0.02 - delta)])
    close(call("bco_pair", logratios=x, reward_mean=torch.tensor(0.01)), [softplus(-0.02) + softplus(-0.03)])


def test_sppo_hard_at_a_point():
    close(call("sppo_hard", logratios=lr(0.3, -0.2)), [(0.3 - 5) ** 2 + (-0.2 + 5) ** 2])  # 22.09 + 23.04


def test_aot_pair_sorts_each_side():
    x = torch.tensor([[0.3, -0.2], [-0.1, 0.4]])  # chosen sorted (-0.1, 0.3), rejected sorted (-0.2, 0.4)
    close(call("aot_pair", logratios=x), [softplus(-0.1 * 0.1), softplus(0.1 * 0.1)])  # delta 0.1, -0.1


def test_aot_sorts_policy_and_reference_margins():
    policy = torch.tensor([[-1.0, -2.0], [-3.0, -1.5]])  # margins 1.0, -1.5 -> sorted (-1.5, 1.0)
    ref = torch.tensor([[-1.2, -1.9], [-2.0, -2.5]])     # margins 0.7, 0.5  -> sorted (0.5, 0.7)
    close(call("aot", policy_logps=policy, ref_logps=ref), [softplus(0.2), softplus(-0.03)], tol=1e-5)


def test_apo_at_a_point():
    x = lr(0.3, -0.2)
    close(call("apo_zero", logratios=x), [1 - sigmoid(0.03) + sigmoid(-0.02)])
    close(call("apo_down", logratios=x), [sigmoid(0.03) + 1 - sigmoid(0.05)])


def test_discopop_at_a_point():
    rho, w = 0.05, sigmoid(0.05 / 0.05)
    close(call("discopop", logratios=lr(0.3, -0.2)), [(1 - w) * softplus(-rho) + w * math.exp(-rho)])


def test_simpo_cpo_orpo_at_a_point():
    policy = torch.tensor([[-6.0, -12.0]], dtype=torch.float64)  # per-token means -2 and -3
    lengths = torch.tensor([[3.0, 4.0]], dtype=torch.float64)
    nll = torch.tensor([2.0], dtype=torch.float64)
    # SimPO, beta 2, gamma 0.5: 2 * (-2 - -3) - 0.5 = 1.5
    close(Objective.parse("simpo")(2.0, policy_logps=policy, lengths=lengths)[0], [softplus(-1.5)])
    # CPO: -log sigmoid(0.1 * (-6 + 12)) + 2
    close(call("cpo", policy_logps=policy, chosen_nll=nll), [softplus(-0.6) + 2.0])
    # ORPO: log odds = log p - log(1 - p) with log p the per-token mean
    odds = (-2 - math.log(1 - math.exp(-2))) - (-3 - math.log(1 - math.exp(-3)))
    close(call("orpo", policy_logps=policy, lengths=lengths, chosen_nll=nll), [2.0 + 0.1 * softplus(-odds)])


def test_orpo_stays_finite_at_probability_one():
    policy = torch.tensor([[0.0, -5.0]], requires_grad=True)
    out = call("orpo", policy_logps=policy, lengths=torch.tensor([[2.0, 2.0]]), chosen_nll=torch.zeros(1))
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(policy.grad).all()


def test_plackett_luce_dpo_k3_by_hand():
    beta, x = 0.5, lr(2.0, 1.0, -2.0, grad=True)  # beta * lr = 1.0, 0.5, -1.0
    a, b, c = 1.0, 0.5, -1.0
    expected = -((a - math.log(math.exp(a) + math.exp(b) + math.exp(c))) + (b - math.log(math.exp(b) + math.exp(c))))
    loss = call("plackett_luce", beta, logratios=x)
    close(loss, [expected])
    loss.sum().backward()
    assert x.grad[0, 0] < 0 < x.grad[0, 2]


def test_dpo_rewards():
    close(dpo_rewards(lr(0.3, -0.2), 0.1), [[0.03, -0.02]])


# ---------------------------------------------------------------------------------------------- combinations

def test_mixed_preference_optimisation_is_the_weighted_sum():
    x, nll = lr(0.3, -0.2), torch.tensor([1.2], dtype=torch.float64)
    total, parts = Objective.parse({"sigmoid": 0.8, "bco_pair": 0.2, "sft": 1.0})(0.1, logratios=x, chosen_nll=nll)
    dpo, bco = softplus(-0.05), 2 * softplus(-0.025)
    close(total, [0.8 * dpo + 0.2 * bco + 1.0 * 1.2])
    assert set(parts) == {"sigmoid", "bco_pair", "sft"}
    close(parts["bco_pair"], [bco])


def test_rpo_is_sigmoid_plus_sft():
    x, nll = lr(0.3, -0.2), torch.tensor([1.2], dtype=torch.float64)
    rpo = Objective.parse("rpo", {"alpha": 0.5})(0.1, logratios=x, chosen_nll=nll)[0]
    mix = Objective.parse({"sigmoid": 1.0, "sft": 0.5})(0.1, logratios=x, chosen_nll=nll)[0]
    close(rpo, mix)


def test_parameters_are_routed_by_name():
    obj = Objective.parse({"conservative": 1.0, "aot_pair": 1.0}, {"label_smoothing": 0.2})
    x = lr(0.3, -0.2)
    total, parts = obj(0.1, logratios=x)
    close(parts["conservative"], [0.8 * softplus(-0.05) + 0.2 * softplus(0.05)])
    close(parts["aot_pair"], parts["conservative"])  # one pair: sorting changes nothing


def test_objective_declares_its_needs():
    assert not Objective.parse("simpo").needs_reference
    assert not Objective.parse({"orpo": 1.0, "sft": 0.5}).needs_reference
    assert Objective.parse({"sigmoid": 1.0, "sft": 1.0}).needs_reference
    assert Objective.parse({"sigmoid": 1.0, "sft": 1.0}).inputs == {"logratios", "chosen_nll"}


def test_objective_refuses_what_it_cannot_use():
    with pytest.raises(ValueError, match="unknown preference loss"):
        Objective.parse("nope")
    with pytest.raises(ValueError, match="not parameters"):
        Objective.parse("sigmoid", {"label_smoothing": 0.1})
    with pytest.raises(ValueError, match="beta"):
        Objective.parse("conservative", {"beta": 0.1})
    with pytest.raises(ValueError, match="chosen_nll"):
        Objective.parse("rpo")(0.1, logratios=lr(0.3, -0.2))


# ---------------------------------------------------------------------------------------------- KTO

def test_kto_by_hand():
    r = torch.tensor([0.5, -0.3, 0.2])
    desirable = torch.tensor([True, False, False])
    out = kto_loss(r, desirable, torch.tensor(0.1), beta=0.5, desirable_weight=1.0, undesirable_weight=2.0)
    close(out, [1 - sigmoid(0.5 * 0.4), 2 * (1 - sigmoid(0.5 * 0.4)), 2 * (1 - sigmoid(0.5 * -0.1))])


def test_kto_reference_point_is_a_clamped_detached_mean():
    x = torch.tensor([0.3, -0.1, 0.1], requires_grad=True)
    z = kto_reference_point(x)
    close(z, 0.1)
    assert not z.requires_grad
    close(kto_reference_point(torch.tensor([-0.5, 0.1])), 0.0)


def test_kto_gradient_raises_desirable_and_lowers_undesirable():
    r = torch.tensor([0.2, 0.2], requires_grad=True)
    kto_loss(r, torch.tensor([True, False]), torch.tensor(0.0), beta=0.1).sum().backward()
    assert r.grad[0] < 0 < r.grad[1]


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
