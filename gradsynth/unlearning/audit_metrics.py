r"""How deep forgetting goes: membership-inference AUCs, truth ratios and the KS forget quality.

Per example, with answer tokens ``y_1..y_n`` (labels not ``-100``) and the model's next-token
distribution ``p_t`` at each of them:

    LOSS      s = -(1/n) sum_t -log p_t(y_t)                       (higher: more member-like)
    zlib      s = sum_t log p_t(y_t) / zlib(text)                  zlib(text): bytes of the
                                                                   zlib-compressed answer text
    Min-K%    s = mean of the k% smallest log p_t(y_t)             (k = 20%, at least one token)
    Min-K%++  s = mean of the k% smallest z_t,
              z_t = (log p_t(y_t) - mu_t) / sigma_t,  mu_t = E_{v~p_t}[log p_t(v)],
              sigma_t^2 = E_{v~p_t}[(log p_t(v))^2] - mu_t^2

The MIA AUC of a score is the probability that a member (forget example) scores above a
non-member, ties counting one half (the Mann-Whitney statistic over ``n_m * n_n``). It is
two-sided in meaning: 0.5 is "cannot tell", and an AUC far *below* 0.5 leaks as much as one far
above (the forget set is then less likely than data never seen), so `mia_aucs` also gives
``|AUC - 0.5|``.

TOFU's truth ratio compares the true answer ``a`` with perturbed answers ``a_j`` (other values
of the same relation), each by its length-normalised probability
``P(a|q)^(1/|a|) = exp(-NLL_mean(a))``:

    log TR = log( mean_j exp(-NLL_mean(a_j)) ) - ( -NLL_mean(a) )

``log TR > 0``: the perturbed answers are more likely than the truth. The forget quality is the
p-value of the two-sample Kolmogorov-Smirnov test between the truth ratios of the unlearned model
and those of a model that never learned the forget set (exact by counting the lattice paths that
stay inside the band, for ``n * m`` up to 10^6).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction

import torch
from torch import Tensor

from gradsynth.unlearning.encoding import IGNORE_INDEX

MIN_K = 0.2
MIA_SCORES = ("loss", "zlib", "min_k", "min_k_pp")


@dataclass(frozen=True)
class TokenStats:
    """One example's answer tokens: log-probabilities and Min-K%++ z-scores, in order."""

    logprobs: tuple[float, ...]
    z_scores: tuple[float, ...]

    @property
    def mean_nll(self) -> float:
        return -sum(self.logprobs) / max(len(self.logprobs), 1)


def token_stats(logits: Tensor, labels: Tensor) -> list[TokenStats]:
    """Per sequence of a batch (``logits [B, T, V]``, ``labels [B, T]``): its answer tokens' stats."""
    logits, targets = logits[:, :-1, :].double(), labels[:, 1:]
    mask = targets != IGNORE_INDEX
    logp = torch.log_softmax(logits, dim=-1)
    chosen = logp.gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    p = logp.exp()
    mu = (p * logp).sum(dim=-1)
    sigma = ((p * logp.square()).sum(dim=-1) - mu.square()).clamp_min(0).sqrt()
    z = (chosen - mu) / sigma.clamp_min(1e-12)
    out = []
    for row in range(logits.shape[0]):
        keep = mask[row]
        out.append(TokenStats(tuple(chosen[row][keep].tolist()), tuple(z[row][keep].tolist())))
    return out


def _lowest_mean(values: Sequence[float], k: float) -> float:
    if not values:
        return float("nan")
    count = max(1, math.ceil(k * len(values)))
    return sum(sorted(values)[:count]) / count


def mia_scores(stats: Sequence[TokenStats], texts: Sequence[str], k: float = MIN_K) -> dict[str, list[float]]:
    """Each MIA score of each example (higher: more member-like); ``texts`` for zlib."""
    if len(stats) != len(texts):
        raise ValueError(f"{len(stats)} examples but {len(texts)} texts")
    if not 0 < k <= 1:
        raise ValueError(f"k must be in (0, 1]; got {k}")
    return {
        "loss": [-s.mean_nll for s in stats],
        "zlib": [
            sum(s.logprobs) / len(zlib.compress(t.encode("utf-8"))) for s, t in zip(stats, texts, strict=True)
        ],
        "min_k": [_lowest_mean(s.logprobs, k) for s in stats],
        "min_k_pp": [_lowest_mean(s.z_scores, k) for s in stats],
    }


def auc(members: Sequence[float], non_members: Sequence[float]) -> float:
    """P(member score > non-member score) + P(equal) / 2, over every pair."""
    if not members or not non_members:
        raise ValueError("the AUC needs at least one member and one non-member score")
    # Mann-Whitney from mid-ranks of the pooled scores: O(n log n), ties shared equally.
    pooled = sorted([(v, 0) for v in members] + [(v, 1) for v in non_members], key=lambda x: x[0])
    rank_sum, i = 0.0, 0
    while i < len(pooled):
        j = i
        while j + 1 < len(pooled) and pooled[j + 1][0] == pooled[i][0]:
            j += 1
        mid = (i + j) / 2 + 1
        rank_sum += mid * sum(1 for x in pooled[i : j + 1] if x[1] == 0)
        i = j + 1
    n_m, n_n = len(members), len(non_members)
    return (rank_sum - n_m * (n_m + 1) / 2) / (n_m * n_n)


def mia_aucs(
    members: dict[str, list[float]], non_members: dict[str, list[float]]
) -> dict[str, dict[str, float]]:
    """``{score: {"auc": ..., "gap": |auc - 0.5|}}`` for every score both sides have."""
    return {
        name: {"auc": (value := auc(members[name], non_members[name])), "gap": abs(value - 0.5)}
        for name in MIA_SCORES
        if name in members and name in non_members
    }


def log_truth_ratio(true_nll: float, perturbed_nlls: Sequence[float]) -> float:
    """``log(mean_j exp(-nll_j)) + nll_true``, from mean answer-token NLLs (see the module)."""
    if not perturbed_nlls:
        raise ValueError("the truth ratio needs at least one perturbed answer")
    low = min(perturbed_nlls)  # log-sum-exp, shifted by the largest probability
    mean = sum(math.exp(low - n) for n in perturbed_nlls) / len(perturbed_nlls)
    return (math.log(mean) - low) + true_nll


def ranks_last(true_nll: float, perturbed_nlls: Sequence[float]) -> bool:
    """Whether the true answer is less likely than every perturbed one."""
    return all(true_nll > n for n in perturbed_nlls)


def _ks_numerator(a: Sequence[float], b: Sequence[float]) -> int:
    """``n * m * sup_x |F_a(x) - F_b(x)|``, an integer (the statistic without rounding)."""
    if not a or not b:
        raise ValueError("the KS test needs two non-empty samples")
    xs, ys = sorted(a), sorted(b)
    n, m = len(xs), len(ys)
    i = j = best = 0
    while i < n and j < m:
        x = min(xs[i], ys[j])
        while i < n and xs[i] == x:
            i += 1
        while j < m and ys[j] == x:
            j += 1
        best = max(best, abs(i * m - j * n))
    return best


def ks_statistic(a: Sequence[float], b: Sequence[float]) -> float:
    """``sup_x |F_a(x) - F_b(x)|`` of the two empirical distributions."""
    return _ks_numerator(a, b) / (len(a) * len(b))


def ks_pvalue(a: Sequence[float], b: Sequence[float]) -> float:
    """Two-sided p-value of the two-sample KS test, ``P(D >= d)`` under the null.

    Exact for ``n * m <= 10**6``: counts the monotone lattice paths from (0, 0) to (n, m) whose
    every point keeps ``|i m - j n| < d n m`` (``d`` the observed statistic), and
    ``p = 1 - paths / C(n + m, n)``, in exact integers up to the final division. Beyond, the
    asymptotic Kolmogorov series with Stephens' small-sample correction.
    """
    n, m = len(a), len(b)
    bound = _ks_numerator(a, b)
    if n * m > 10**6:
        root = math.sqrt(n * m / (n + m))
        lam = (root + 0.12 + 0.11 / root) * bound / (n * m)
        series = sum((-1) ** (k - 1) * math.exp(-2 * k * k * lam * lam) for k in range(1, 101))
        return min(1.0, max(0.0, 2 * series))
    row = [0] * (m + 1)
    for i in range(n + 1):
        for j in range(m + 1):
            if abs(i * m - j * n) >= bound:
                row[j] = 0
            elif i == 0 and j == 0:
                row[j] = 1
            else:
                row[j] = (row[j] if i > 0 else 0) + (row[j - 1] if j > 0 else 0)
    return float(1 - Fraction(row[m], math.comb(n + m, n)))
