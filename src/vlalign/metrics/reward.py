"""Reward accuracy: how often a scorer ranks the chosen response of a held-out pair above the rejected one.

The scorer is a reward model r(x, y) (``RewardModule``) or DPO's implicit reward
r(x, y) = beta * (log pi(y | x) - log pi_ref(y | x)) (Rafailov et al. 2023, eq. 5). These are the pure
functions behind ``eval/reward_accuracy.py`` (an exported reward model on shards) and the training-time
``evaluation.RewardAccuracyTask`` (the live policy or reward model): one implementation of the metrics.

    accuracy      = mean_i [ r(x_i, y_w) > r(x_i, y_l) ]       (ties count as wrong, as in RewardModule)
    margin_mean   = mean_i  r(x_i, y_w) - r(x_i, y_l)
    reward_mean / reward_std over all 2n rewards; chosen_mean, rejected_mean; n

plus a 95% percentile-bootstrap interval of the accuracy over pairs (``accuracy_ci``).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def reward_metrics(chosen: Sequence[float], rejected: Sequence[float], n_boot: int = 1000, seed: int = 0) -> dict:
    """Accuracy, margin and reward statistics of aligned chosen / rejected rewards (see the module docstring).

    ``n_boot`` bootstrap resamples of the pairs, drawn with ``seed``, give ``accuracy_ci`` (2.5% and 97.5%
    quantiles); ``n_boot=0`` leaves it out.
    """
    c, r = np.asarray(chosen, dtype=np.float64), np.asarray(rejected, dtype=np.float64)
    if c.shape != r.shape or c.ndim != 1 or not len(c):
        raise ValueError(f"need aligned non-empty 1-D rewards, got shapes {c.shape} and {r.shape}")
    correct = (c > r).astype(np.float64)
    both = np.concatenate([c, r])
    out = {"accuracy": float(correct.mean())}
    if n_boot:
        rng = np.random.default_rng(seed)
        boot = correct[rng.integers(0, len(c), size=(n_boot, len(c)))].mean(1)
        out["accuracy_ci"] = [float(np.quantile(boot, 0.025)), float(np.quantile(boot, 0.975))]
    return {**out, "margin_mean": float((c - r).mean()), "reward_mean": float(both.mean()),
            "reward_std": float(both.std(ddof=1)) if len(both) > 1 else 0.0,
            "chosen_mean": float(c.mean()), "rejected_mean": float(r.mean()), "n": int(len(c))}


def grouped_accuracy(ids: Sequence[str], chosen: Sequence[float], rejected: Sequence[float],
                     groups: dict) -> dict[str, dict]:
    """{group value: {"accuracy", "n"}} over aligned pairs, sorted by value; ``groups`` maps a pair's id to its
    group (ids not in it go under ``"(none)"``)."""
    acc: dict[str, list] = {}
    for i, c, r in zip(ids, chosen, rejected):
        acc.setdefault(str(groups.get(i, "(none)")), []).append(float(c > r))
    return {g: {"accuracy": sum(v) / len(v), "n": len(v)} for g, v in sorted(acc.items())}
