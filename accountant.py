"""RDP accountant for DP-SGD with Poisson sampling: (q, sigma, steps) -> (eps, delta), and back.

The mechanism is the Poisson-subsampled Gaussian: every example joins a step's batch independently with
probability q, and the sum of clipped per-example gradients gets N(0, sigma^2 C^2 I) noise. Its Renyi DP is
computed exactly, following

  Mironov, Talwar & Zhang, "Renyi Differential Privacy of the Sampled Gaussian Mechanism" (2019), Sec. 3.3:
  integer orders by the binomial expansion, fractional orders by the two-series expansion

(rdp_reference writes their sums out term by term, for reading; rdp_subsampled_gaussian computes the same sums
vectorised and is tested against it); steps compose by adding RDP order by order (Mironov, "Renyi Differential
Privacy", 2017, Prop. 1), and RDP turns into (eps, delta)-DP by the improved conversion of

  Balle, Barthe, Gaboardi, Hsu & Sato, "Hypothesis Testing Interpretations and Renyi Differential Privacy"
  (AISTATS 2020), Theorem 21.

A later section checks the claim from the other side: the one-run privacy audit of Steinke, Nasr & Jagielski
(NeurIPS 2023), an empirical LOWER bound on eps from canaries (every script's --audit M).

What is simplified: add/remove-one adjacency under Poisson sampling only (what data.poisson_batches does), and
eps is minimised over a fixed grid of orders (DEFAULT_ORDERS), so it is an upper bound, never an estimate.

  python accountant.py --q 0.004267 --sigma 1.1 --steps 14062 --delta 1e-5   # eps = 2.5968, best order 8.1 (<1 s)
  python accountant.py --eps 3 --batch-size 256 --n 60000 --epochs 60        # delta 1/(2N): sigma = 1.0193 (<1 s)
  python tests/bench.py accountant                                          # ms per epsilon / calibrate call

The DP-SGD paper's MNIST setting (Abadi et al. 2016: q = 256/60000, sigma = 1.1, 60 epochs, delta = 1e-5):

>>> round(epsilon(q=256 / 60000, sigma=1.1, steps=14063, delta=1e-5), 4)
2.5967

With the classic conversion eps = min rdp - log(delta) / (alpha - 1) and TF Privacy's coarse grid the same RDP
gives ~3.0, and TF Privacy's MNIST tutorial setting (sigma = 1.12, 14040 steps) its published 2.92; see
tests/test_accountant.py.
"""
import argparse
import math
import sys
import warnings
from functools import lru_cache

import numpy as np

__all__ = ["DEFAULT_ORDERS", "rdp_subsampled_gaussian", "epsilon_from_rdp", "epsilon", "calibrate_sigma",
           "RDPAccountant", "dp_sgd_plan", "noise_to_signal", "noise_budget", "audit_p_value",
           "audit_epsilon_lower_bound", "CanaryAudit"]

# Orders alpha at which RDP is tracked. A superset of the usual coarse grid (1.1, 1.2, ..., 10.9, 12, ..., 63), so
# the minimum over it is never looser than that grid's; steps of 0.05 up to 11 and 0.01 near 1 (large eps, few
# steps), then integers with about 3% spacing up to 1024 (large sigma, many steps: the best order climbs into the
# hundreds). Integer orders are cheap (a finite sum); fractional ones need the slower two-series expansion.
DEFAULT_ORDERS = np.unique(np.concatenate([
    1 + np.arange(1, 10) / 100,          # 1.01 .. 1.09
    1 + np.arange(1, 100) / 10,          # 1.1 .. 10.9: exactly the floats 1 + x / 10 of the coarse grid
    1 + np.arange(1, 200, 2) / 20,       # 1.05 .. 10.95
    np.arange(11, 65),                   # 11 .. 64
    np.arange(66, 129, 2),               # 66 .. 128
    np.arange(132, 257, 4),              # 132 .. 256
    np.arange(264, 513, 8),              # 264 .. 512
    np.arange(528, 1025, 16),            # 528 .. 1024
]).astype(np.float64))
DEFAULT_ORDERS.setflags(write=False)

_MAX_ORDER = 10_000       # integer orders cost O(alpha) terms each
_SERIES_RTOL = 1e-12      # fractional series: stop when the next terms are this small relative to the sum
_SERIES_MAX_TERMS = 1 << 14
_EULER_K = 24           # terms averaged by the Euler transform at the end of each series


# --- RDP of the subsampled Gaussian, the reference: the one a reader checks ----------------------------------
# With mu0 = N(0, sigma^2), mu1 = N(1, sigma^2) and mu = (1 - q) mu0 + q mu1, the RDP at order alpha is
#   rdp(alpha) = log(A_alpha) / (alpha - 1),   A_alpha = E_{z ~ mu0}[((1 - q) + q exp((2z - 1) / (2 sigma^2)))^alpha]
# (Mironov, Talwar & Zhang 2019, Sec. 3.3). rdp_reference below writes out their two expansions of A_alpha for one
# order, term by term, with plain loops and `math`; rdp_subsampled_gaussian (the fast path) sums the same terms
# vectorised over every order at once, and tests/test_accountant.py holds the two to 1e-10 relative.
# One step beyond the paper's text, in both: when q is tiny A_alpha = 1 + O(q^2), and log(A_alpha) taken from
# A_alpha itself keeps only the digits left after the leading 1. So both compute log(A_alpha - 1), subtracting the
# 1 term by term as a binomial series that sums to it, and finish with log1p.

def _ref_log_sum(parts):
    """log(sum of sign * exp(log_abs)) over (log_abs, sign) pairs; the sum must be > 0."""
    top = max(log_abs for log_abs, _ in parts)
    return top + math.log(math.fsum(sign * math.exp(log_abs - top) for log_abs, sign in parts))


def _ref_log_abs_expm1(x):
    """log|exp(x) - 1| (-inf at x = 0), without overflow for large x."""
    if x > 40:
        return x + math.log1p(-math.exp(-x))
    return math.log(abs(math.expm1(x))) if x != 0 else -math.inf


def _ref_log_phi(x):
    """log Phi(x), Phi the standard normal CDF, accurate in both tails."""
    if x > 0:
        return math.log1p(-math.erfc(x / math.sqrt(2)) / 2)
    if x > -20:
        return math.log(math.erfc(-x / math.sqrt(2)) / 2)
    # erfc underflows beyond: Phi(x) = phi(x) / |x| sum_n (-1)^n (2n - 1)!! / x^(2n) (Abramowitz & Stegun 26.2.12)
    series = sum((-1) ** n * math.prod(range(1, 2 * n, 2)) / x ** (2 * n) for n in range(16))
    return -x * x / 2 - math.log(-x) - 0.5 * math.log(2 * math.pi) + math.log(series)


def _ref_log_a_minus_1_int(q, sigma, alpha):
    """log(A_alpha - 1) for integer alpha: the binomial expansion (Mironov et al. 2019, Sec. 3.3)."""
    parts = []
    for k in range(2, alpha + 1):
        # A_alpha = sum_{k=0}^{alpha} C(alpha, k) (1 - q)^(alpha - k) q^k exp((k^2 - k) / (2 sigma^2)), and
        #       1 = sum_{k=0}^{alpha} C(alpha, k) (1 - q)^(alpha - k) q^k                     (the binomial theorem),
        # so A_alpha - 1 = sum_k C(alpha, k) (1 - q)^(alpha - k) q^k (exp((k^2 - k) / (2 sigma^2)) - 1), where the
        # terms k = 0, 1 vanish and every other one is positive.
        log_term = (math.log(math.comb(alpha, k)) + (alpha - k) * math.log1p(-q) + k * math.log(q)
                    + _ref_log_abs_expm1((k * k - k) / (2 * sigma ** 2)))
        parts.append((log_term, 1.0))
    return _ref_log_sum(parts)


def _ref_frac_term(q, sigma, alpha, i, log_c, sign_c, z0):
    """Term i of A_alpha - 1 for fractional alpha, as (log_abs, sign) parts; log_c, sign_c: log|C(alpha, i)|
    and its sign."""
    j = alpha - i
    # the first series:  A_alpha,1 = sum_i w1 exp(x1) erfc((i - z0) / (sqrt(2) sigma)) / 2 = sum_i w1 exp(x1) Phi(y1)
    log_w1 = log_c + j * math.log1p(-q) + i * math.log(q)               # w1 = C(alpha, i) (1 - q)^(alpha - i) q^i
    x1, y1 = (i * i - i) / (2 * sigma ** 2), (z0 - i) / sigma
    # the second series: A_alpha,2 = sum_i w2 exp(x2) erfc((z0 - j) / (sqrt(2) sigma)) / 2 = sum_i w2 exp(x2) Phi(y2)
    log_w2 = log_c + i * math.log1p(-q) + j * math.log(q)               # w2 = C(alpha, i) (1 - q)^i q^(alpha - i)
    x2, y2 = (j * j - j) / (2 * sigma ** 2), (j - z0) / sigma
    # A_alpha = A_alpha,1 + A_alpha,2. The 1 to subtract is the binomial series of ((1 - q) + q)^alpha, sum_i w1 when
    # q <= 1/2 (where it converges), sum_i w2 when q > 1/2; its term i goes with term i above, by
    # exp(x) Phi(y) - 1 = expm1(x) Phi(y) - Phi(-y).
    if q <= 0.5:
        return [(log_w1 + _ref_log_abs_expm1(x1) + _ref_log_phi(y1), sign_c),    # x1 >= 0 at every integer i
                (log_w1 + _ref_log_phi(-y1), -sign_c),
                (log_w2 + x2 + _ref_log_phi(y2), sign_c)]
    return [(log_w1 + x1 + _ref_log_phi(y1), sign_c),
            (log_w2 + _ref_log_abs_expm1(x2) + _ref_log_phi(y2), sign_c * math.copysign(1.0, x2)),
            (log_w2 + _ref_log_phi(-y2), -sign_c)]


def _ref_euler(partial_sums, k):
    """Averages neighbouring partial sums k times: a weighted mean of them, so the same limit whatever the terms'
    signs, and for alternating terms of smooth size (the tails here) a far smaller error than the last sum's."""
    for _ in range(k):
        partial_sums = [(a + b) / 2 for a, b in zip(partial_sums, partial_sums[1:])]
    return partial_sums[0]


def _ref_log_a_minus_1_frac(q, sigma, alpha, euler_k=20, rtol=1e-13):
    """log(A_alpha - 1) for fractional alpha: the two-series expansion (Mironov et al. 2019, Sec. 3.3)."""
    z0 = sigma ** 2 * (math.log1p(-q) - math.log(q)) + 0.5        # where q mu1(z) = (1 - q) mu0(z): the split
    terms, log_c, sign_c = [], 0.0, 1.0                            # C(alpha, 0) = 1
    n = math.ceil(alpha) + euler_k + 16
    while True:
        while len(terms) < n:
            i = len(terms)
            terms.append(_ref_frac_term(q, sigma, alpha, i, log_c, sign_c, z0))
            # C(alpha, i + 1) = C(alpha, i) (alpha - i) / (i + 1): the sign flips at every i > alpha, where both
            # series start to alternate
            log_c += math.log(abs(alpha - i)) - math.log(i + 1)
            sign_c *= math.copysign(1.0, alpha - i)
        top = max(log_abs for parts in terms for log_abs, _ in parts)
        t = [math.fsum(sign * math.exp(log_abs - top) for log_abs, sign in parts) for parts in terms]  # / exp(top)
        partial = [math.fsum(t[:m]) for m in range(n - euler_k - 1, n + 1)]  # S_m = t_0 + ... + t_(m-1)
        now, before = _ref_euler(partial[1:], euler_k), _ref_euler(partial[:-1], euler_k)  # n terms, n - 1 terms
        floor = 8 * sys.float_info.epsilon * math.fsum(abs(x) for x in t)  # what rounding the terms can hide
        if abs(now - before) <= max(rtol * abs(now), floor):
            return math.log(max(now, floor)) + top
        if n > 1 << 16:
            raise RuntimeError(f"rdp_reference: the series did not converge (q={q}, sigma={sigma}, alpha={alpha})")
        n *= 2


def rdp_reference(*, q, sigma, order):
    """RDP of one step of the Poisson-subsampled Gaussian at ONE order: Mironov et al. 2019, Sec. 3.3, line by
    line (slow; rdp_subsampled_gaussian is the one to call, and is tested against this one).

    >>> round(rdp_reference(q=0.01, sigma=1.0, order=2), 12)  # log(1 + q^2 (e^(1/sigma^2) - 1)), closed form
    0.000171813422
    """
    q, sigma, alpha = _check_q(q), _check_sigma(sigma), float(_check_orders([order])[0])
    if q == 0 or sigma == math.inf:
        return 0.0
    if sigma == 0:
        return math.inf
    if q == 1:  # the Gaussian mechanism, alpha / (2 sigma^2) (Mironov 2017, Prop. 7): z0 = -inf, no split to make
        return alpha / (2 * sigma ** 2)
    if alpha == int(alpha):
        log_a_minus_1 = _ref_log_a_minus_1_int(q, sigma, int(alpha))
    else:
        log_a_minus_1 = _ref_log_a_minus_1_frac(q, sigma, alpha)
    # rdp = log(A_alpha) / (alpha - 1) = log1p(A_alpha - 1) / (alpha - 1)
    if log_a_minus_1 > 30:
        return (log_a_minus_1 + math.log1p(math.exp(-log_a_minus_1))) / (alpha - 1)
    return math.log1p(math.exp(log_a_minus_1)) / (alpha - 1)


# --- the fast path: log-space arithmetic -----------------------------------------------------------------------
# Everything below works with logarithms of magnitudes, so that terms like q^i exp(i^2 / 2 sigma^2) neither
# overflow nor underflow, and signed sums keep positive and negative parts apart until the single final subtraction.

def _logsumexp(x, axis=-1):
    """log(sum(exp(x))) along axis; -inf where every entry is -inf."""
    m = np.max(x, axis=axis, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    with np.errstate(divide="ignore"):
        return np.log(np.sum(np.exp(x - m), axis=axis)) + np.squeeze(m, axis=axis)


def _log_sub(a, b):
    """log(exp(a) - exp(b)) elementwise, -inf where a <= b (the difference is not positive)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        out = a + np.log(-np.expm1(b - a))
    return np.where(a > b, out, -np.inf)


def _log_expm1(x):
    """log(exp(x) - 1) for x >= 0 (-inf at 0), without overflow for large x."""
    x = np.asarray(x, dtype=np.float64)
    with np.errstate(divide="ignore"):
        small = np.log(np.expm1(np.minimum(x, 40.0)))
    return np.where(x > 40.0, x + np.log1p(-np.exp(-np.maximum(x, 40.0))), small)


_ERFC = np.frompyfunc(math.erfc, 1, 1)
_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)
# Phi(x) ~ phi(x) / |x| * sum_n (-1)^n (2n-1)!! / x^(2n) as x -> -inf (Abramowitz & Stegun 26.2.12); 16 terms
# are exact to double precision for |x| >= 15.
_ASYM_COEF = np.array([(-1) ** n * math.prod(range(1, 2 * n, 2)) for n in range(16)], dtype=np.float64)


def _log_ndtr_asymptotic(x):
    """log Phi(x) for x <= -15 by the asymptotic series."""
    inv2 = 1.0 / (x * x)
    series = np.polyval(_ASYM_COEF[::-1], inv2)
    return -0.5 * x * x - np.log(-x) - _LOG_SQRT_2PI + np.log(series)


def _log_ndtr(x):
    """log of the standard normal CDF, accurate in both tails (relative error ~1e-15)."""
    x = np.asarray(x, dtype=np.float64)
    out = np.empty(x.shape)
    lo, hi = x < -15.0, x > 15.0
    mid = ~(lo | hi)
    xm = x[mid]
    tail = _ERFC(np.abs(xm) / math.sqrt(2)).astype(np.float64) / 2  # Phi(-|x|): the small side keeps its digits
    out[mid] = np.where(xm < 0, np.log(tail), np.log1p(-tail))
    out[lo] = _log_ndtr_asymptotic(x[lo])
    out[hi] = -np.exp(_log_ndtr_asymptotic(-x[hi]))  # log(1 - t) = -t for t < 1e-50
    return out


# --- the fast path: RDP of the subsampled Gaussian mechanism ---------------------------------------------------
# The sums of rdp_reference (A_alpha and log(A_alpha - 1) as defined there), for every order of a grid at once:
# integer orders as one ragged array of binomial terms, fractional ones as (orders, terms) arrays whose alternating
# tails are Euler-accelerated. Tables that depend only on the orders are cached, so a grid pays for them once.

@lru_cache(maxsize=16)
def _int_layout(alphas: tuple):
    """Flat (ragged) layout of the terms k = 2..alpha of every integer alpha: row, k and log C(alpha, k)."""
    a = np.array(alphas, dtype=np.int64)
    counts = a - 1
    row = np.repeat(np.arange(a.size), counts)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    k = np.arange(counts.sum()) - np.repeat(starts, counts) + 2
    log_fact = np.concatenate([[0.0], np.cumsum(np.log(np.arange(1, a.max() + 1)))])
    log_binom = log_fact[a[row]] - log_fact[k] - log_fact[a[row] - k]
    return row, starts, k, (a[row] - k).astype(np.float64), log_binom


def _log_a_minus_1_int(alphas, q, sigma):
    """log(A_alpha - 1) for integer alpha (Mironov et al. 2019, Sec. 3.3, the binomial expansion).

    A_alpha = sum_k C(alpha, k) (1 - q)^(alpha - k) q^k exp((k^2 - k) / (2 sigma^2)). The binomial weights sum to
    1, so A_alpha - 1 = sum_{k >= 2} C(alpha, k) (1 - q)^(alpha - k) q^k expm1((k^2 - k) / (2 sigma^2)): all terms
    positive, no cancellation anywhere.
    """
    row, starts, k, a_minus_k, log_binom = _int_layout(tuple(int(a) for a in alphas))
    kk = np.arange(int(alphas.max()) + 1, dtype=np.float64)
    log_em1 = _log_expm1(kk * (kk - 1) / (2 * sigma ** 2))
    terms = log_binom + a_minus_k * math.log1p(-q) + kk[k] * math.log(q) + log_em1[k]
    top = np.maximum.reduceat(terms, starts)
    top = np.where(np.isfinite(top), top, 0.0)
    # terms below exp(-40) of their row's largest cannot move the sum: skip their exp
    rel = terms - top[row]
    keep = rel > -40.0
    with np.errstate(divide="ignore"):
        return np.log(np.bincount(row[keep], weights=np.exp(rel[keep]), minlength=starts.size)) + top


@lru_cache(maxsize=64)
def _frac_binom_table(alphas: tuple, n: int):
    """log|C(alpha, i)| and sign(C(alpha, i)) for fractional alphas, i = 0..n-1 (generalised binomials).

    By C(alpha, i + 1) = C(alpha, i) (alpha - i) / (i + 1): the sign flips at every i > alpha, which is where the
    series of the fractional expansion start to alternate.
    """
    a = np.array(alphas, dtype=np.float64)[:, None]
    m = np.arange(n - 1, dtype=np.float64)[None, :]
    steps = np.log(np.abs(a - m)) - np.log(m + 1)
    log_abs = np.concatenate([np.zeros((a.shape[0], 1)), np.cumsum(steps, axis=1)], axis=1)
    sign = np.concatenate([np.ones((a.shape[0], 1)), np.cumprod(np.sign(a - m), axis=1)], axis=1)
    return log_abs, sign


def _log_abs_expm1(x):
    """(log|exp(x) - 1|, sign(x)) elementwise."""
    x = np.asarray(x, dtype=np.float64)
    with np.errstate(divide="ignore"):
        neg = np.log(-np.expm1(np.minimum(x, 0.0)))
    return np.where(x < 0, neg, _log_expm1(np.maximum(x, 0.0))), np.sign(x)


@lru_cache(maxsize=16)
def _frac_layout(alphas: tuple):
    """Fractional parts of the alphas (unique, with each alpha's index into them) and integer parts: j = alpha - i
    takes one of few values f + integer, so Phi at (j - z0) / sigma is tabulated once per fractional part f."""
    a = np.array(alphas, dtype=np.float64)
    whole = np.floor(a)
    frac, group = np.unique(a - whole, return_inverse=True)
    return frac, group, whole.astype(np.int64)


def _frac_terms(alphas, n, q, sigma):
    """The signed terms of A_alpha - 1 for fractional alpha: log magnitudes and signs, (alphas, parts, n).

    Mironov et al. 2019, Sec. 3.3: split the real line at z0 = sigma^2 log(1/q - 1) + 1/2, where q mu1 = (1 - q) mu0,
    expand (1 - q + q r)^alpha on each side as a binomial series in its smaller part, and integrate term by term:
        A_alpha = sum_i C(alpha, i) (1 - q)^(alpha - i) q^i     exp((i^2 - i) / 2 sigma^2) Phi((z0 - i) / sigma)
                + sum_i C(alpha, i) (1 - q)^i     q^(alpha - i) exp((j^2 - j) / 2 sigma^2) Phi((j - z0) / sigma),
    with j = alpha - i. The binomial series sum_i C(alpha, i) (1 - q)^(alpha - i) q^i of the first line converges to
    ((1 - q) + q)^alpha = 1 when q <= 1/2 (that of the second line when q >= 1/2), so subtracting it term by term
    leaves A_alpha - 1, with each bracket exp(x) Phi(y) - 1 = expm1(x) Phi(y) - Phi(-y) split in its signed parts.
    C(alpha, i) alternates in sign for i > alpha, so every part is a signed, alternating series: never summed by
    absolute value.
    """
    key = tuple(float(a) for a in alphas)
    log_c, sign_c = _frac_binom_table(key, n)
    i = np.arange(n, dtype=np.float64)
    j = alphas[:, None] - i
    log_q, log_1mq = math.log(q), math.log1p(-q)
    z0 = sigma ** 2 * (log_1mq - log_q) + 0.5
    x1, y1 = i * (i - 1) / (2 * sigma ** 2), (z0 - i) / sigma   # exp(x1) Phi(y1): the first line's integrals
    x2 = j * (j - 1) / (2 * sigma ** 2)                          # and the second line's, at y2 = (j - z0) / sigma
    frac, group, whole = _frac_layout(key)
    first = whole.min() - (n - 1)  # j = frac[group] + (whole - i), whole - i >= first
    table_y2 = (frac[:, None] + np.arange(first, whole.max() + 1) - z0) / sigma
    at = (group[:, None], whole[:, None] - np.arange(n) - first)
    w1 = log_c + j * log_1mq + i * log_q
    w2 = log_c + i * log_1mq + j * log_q
    if q <= 0.5:
        parts = [(w1 + _log_expm1(x1) + _log_ndtr(y1), sign_c), (w1 + _log_ndtr(-y1), -sign_c),
                 (w2 + x2 + _log_ndtr(table_y2)[at], sign_c)]
    else:
        log_em1, sign_em1 = _log_abs_expm1(x2)
        parts = [(w1 + x1 + _log_ndtr(y1), sign_c), (w2 + log_em1 + _log_ndtr(table_y2)[at], sign_c * sign_em1),
                 (w2 + _log_ndtr(-table_y2)[at], -sign_c)]
    return (np.stack([np.broadcast_to(p[0], log_c.shape) for p in parts], axis=1),
            np.stack([np.broadcast_to(p[1], log_c.shape) for p in parts], axis=1))


@lru_cache(maxsize=8)
def _euler_weights(n, k):
    """Weights on the terms 0..n-1 that turn a truncated alternating series into its Euler-accelerated sum.

    Averaging consecutive partial sums k times (the Euler transform of the tail) puts weight P(Binomial(k, 1/2) >= m)
    on the m-th of the last k terms; for alternating terms of smooth magnitude f(i) the error drops from ~f(n) to
    ~f(n) * (k-th difference of f) / 2^k.
    """
    w = np.ones(n)
    tail = np.cumsum([math.comb(k, m) for m in range(k, -1, -1)])[::-1] / 2.0 ** k  # P(Bin >= m), m = 0..k
    w[n - k:] = tail[1:]
    return w


def _log_a_minus_1_frac(alphas, q, sigma):
    """log(A_alpha - 1) for fractional alpha by the two-series expansion (_frac_terms), Euler-accelerated; the
    number of terms doubles until truncating one term earlier changes the sum by less than _SERIES_RTOL."""
    out = np.full(alphas.shape, np.nan)
    todo = np.arange(alphas.size)
    n = int(math.ceil(alphas.max())) + _EULER_K + 16
    while todo.size:
        log_t, sign = _frac_terms(alphas[todo], n, q, sigma)
        top = np.max(log_t, axis=(1, 2))
        top = np.where(np.isfinite(top), top, 0.0)
        cols = np.sum(sign * np.exp(log_t - top[:, None, None]), axis=1)  # (alphas, n), scaled by exp(top)
        now = cols @ _euler_weights(n, _EULER_K)
        before = cols[:, :-1] @ _euler_weights(n - 1, _EULER_K)
        floor = 8 * np.finfo(float).eps * np.sum(np.abs(cols), axis=1)  # what rounding can hide
        done = (np.abs(now - before) <= np.maximum(_SERIES_RTOL * np.abs(now), floor)) | (n >= _SERIES_MAX_TERMS)
        with np.errstate(divide="ignore"):
            # never below what rounding could hide: an upper bound on RDP is safe, an understatement is not
            out[todo[done]] = np.log(np.maximum(now, floor)[done]) + top[done]
        todo = todo[~done]
        n *= 2
    return out


def rdp_subsampled_gaussian(*, q, sigma, orders):
    """RDP of ONE step of the Poisson-subsampled Gaussian mechanism at each order (Mironov et al. 2019, Sec. 3.3).

    q: sampling rate in [0, 1]; sigma: noise multiplier (std of the noise / L2 sensitivity) >= 0; orders: alphas > 1.
    Integer orders use the exact binomial expansion, fractional ones the two-series expansion, both in log space:
    the sums of rdp_reference, vectorised over the orders, and tested against it to 1e-10 relative.
    q = 1 is the Gaussian mechanism, alpha / (2 sigma^2) exactly (Mironov 2017, Prop. 7); q = 0 gives 0; sigma = 0
    gives inf.

    >>> rdp_subsampled_gaussian(q=1.0, sigma=2.0, orders=[2, 3.5]).tolist()
    [0.25, 0.4375]
    """
    q, sigma = _check_q(q), _check_sigma(sigma)
    orders = _check_orders(orders)
    if q == 0 or sigma == math.inf:
        return np.zeros(orders.shape)
    if sigma == 0:
        return np.full(orders.shape, np.inf)
    if q == 1:
        return orders / (2 * sigma ** 2)
    is_int = orders == np.round(orders)
    log_am1 = np.empty(orders.shape)
    if is_int.any():
        log_am1[is_int] = _log_a_minus_1_int(orders[is_int], q, sigma)
    if (~is_int).any():
        log_am1[~is_int] = _log_a_minus_1_frac(orders[~is_int], q, sigma)
    return np.logaddexp(0.0, log_am1) / (orders - 1)  # log1p(A - 1) / (alpha - 1)


# --- RDP -> (eps, delta) ----------------------------------------------------------------------------------------

def _eps_and_order(rdp, orders, delta):
    """Balle et al. 2020, Theorem 21, minimised over the orders, without the edge warning."""
    with np.errstate(invalid="ignore"):
        eps = rdp + np.log1p(-1.0 / orders) - (math.log(delta) + np.log(orders)) / (orders - 1)
    best = int(np.argmin(eps))
    return max(float(eps[best]), 0.0), best


def epsilon_from_rdp(*, rdp, orders, delta):
    """(eps, best order) for a mechanism with RDP rdp[k] at orders[k]: Balle et al. 2020, Theorem 21,

        eps = min over alpha of  rdp(alpha) + log((alpha - 1) / alpha) - (log(delta) + log(alpha)) / (alpha - 1),

    clipped at 0. Tighter than the classic rdp - log(delta) / (alpha - 1) (Mironov 2017, Prop. 3) by about
    log(alpha) / (alpha - 1). Warns when the best order is the smallest or largest of the grid (eps could be lower
    with a wider grid). RDP zero at every order means the two neighbouring distributions are equal: eps = 0.

    >>> eps, order = epsilon_from_rdp(rdp=[1.0, 1.5, 5.0], orders=[2, 3, 4], delta=1e-5)
    >>> round(eps, 6), order  # at alpha = 3: 1.5 + log(2/3) - (log(1e-5) + log(3)) / 2
    (6.301691, 3.0)
    """
    orders = _check_orders(orders)
    rdp = np.asarray(rdp, dtype=np.float64)
    if rdp.shape != orders.shape:
        raise ValueError(f"rdp has shape {rdp.shape} but orders has shape {orders.shape}")
    if np.isnan(rdp).any() or (rdp < 0).any():
        raise ValueError("rdp must be >= 0 (and not NaN) at every order")
    delta = _check_delta(delta)
    if not rdp.any():
        return 0.0, float(orders.max())
    eps, best = _eps_and_order(rdp, orders, delta)
    if 0 < eps < math.inf and orders.size > 1 and orders[best] in (orders.min(), orders.max()):
        warnings.warn(f"best RDP order {orders[best]:g} is at the edge of the order grid "
                      f"[{orders.min():g}, {orders.max():g}]; eps = {eps:.4g} may be loose", stacklevel=2)
    return eps, float(orders[best])


def epsilon(*, q, sigma, steps, delta, orders=DEFAULT_ORDERS):
    """eps of `steps` steps of the Poisson-subsampled Gaussian (RDP composition, then Balle et al. 2020, Thm. 21).

    >>> epsilon(q=1.0, sigma=1.0, steps=0, delta=1e-5)
    0.0
    """
    steps = _check_steps(steps)
    q, sigma, delta = _check_q(q), _check_sigma(sigma), _check_delta(delta)
    if steps == 0 or q == 0:
        return 0.0
    rdp = steps * rdp_subsampled_gaussian(q=q, sigma=sigma, orders=orders)
    return epsilon_from_rdp(rdp=rdp, orders=orders, delta=delta)[0]


def calibrate_sigma(*, target_eps, q, steps, delta, prior_rdp=None):
    """The smallest sigma (to 1e-4 relative) whose eps over DEFAULT_ORDERS is <= target_eps; never above it.

    prior_rdp: RDP at DEFAULT_ORDERS already spent on the same data (an earlier DP run this one starts from);
    then sigma is the smallest whose COMPOSED eps (prior + these steps: RDP adds up) is <= target_eps.

    Root finding in log(sigma) on a bracket [lo, hi] with eps(lo) > target_eps >= eps(hi), returning hi. eps is
    strictly decreasing in sigma, so the true boundary lies in (lo, hi], and the search stops once hi / lo < 1 + 1e-4.
    The bracket shrinks by false position on log(eps) (Illinois variant: nearly linear in log(sigma), so a handful
    of evaluations suffice), each step kept at least half the tolerance inside the bracket so that it closes.
    """
    target_eps = _check_eps(target_eps)
    q, steps, delta = _check_q(q), _check_steps(steps), _check_delta(delta)
    if q == 0 or steps == 0:
        return 0.0
    orders, log_target, tol = DEFAULT_ORDERS, math.log(target_eps), math.log1p(1e-4)
    prior_rdp = np.zeros(orders.shape) if prior_rdp is None else np.asarray(prior_rdp, dtype=np.float64)
    if prior_rdp.shape != orders.shape or np.isnan(prior_rdp).any() or (prior_rdp < 0).any():
        raise ValueError(f"prior_rdp must hold {orders.size} values >= 0, one per DEFAULT_ORDERS")
    prior_eps = _eps_and_order(prior_rdp, orders, delta)[0] if prior_rdp.any() else 0.0
    if prior_eps >= target_eps:
        raise ValueError(f"the earlier run this one starts from already spent eps={prior_eps:.3f} at "
                         f"delta={delta:.3g}: nothing is left of --eps {target_eps:g}")

    def g(log_sigma):  # > 0: sigma too small
        rdp = prior_rdp + steps * rdp_subsampled_gaussian(q=q, sigma=math.exp(log_sigma), orders=orders)
        return math.log(max(_eps_and_order(rdp, orders, delta)[0], 1e-300)) - log_target

    lo, g_lo = 0.0, g(0.0)  # sigma = 1
    hi, g_hi = lo, g_lo
    while g_hi > 0:  # find hi
        lo, g_lo = hi, g_hi
        hi = hi + math.log(4)
        if hi > math.log(1e4):
            raise ValueError(f"target eps {target_eps:g} is not reachable with sigma <= 1e4 at q={q:g}, "
                             f"steps={steps}, delta={delta:g} (eps has a floor set by the largest order)")
        g_hi = g(hi)
    while g_lo <= 0 and lo > math.log(1e-6):  # find lo
        hi, g_hi = lo, g_lo
        lo = lo - math.log(4)
        g_lo = g(lo)
    side = 0
    while hi - lo > tol:
        x = hi - g_hi * (hi - lo) / (g_hi - g_lo)
        x = min(max(x, lo + tol / 2), hi - tol / 2)
        gx = g(x)
        if gx > 0:
            lo, g_lo = x, gx
            g_hi = g_hi / 2 if side == -1 else g_hi  # Illinois: the end kept twice running loses half its weight
            side = -1
        else:
            hi, g_hi = x, gx
            g_lo = g_lo / 2 if side == 1 else g_lo
            side = 1
    sigma = math.exp(hi)
    if not prior_rdp.any():
        epsilon(q=q, sigma=sigma, steps=steps, delta=delta)  # only for its edge-of-grid warning
    return sigma


# --- a DP-SGD run's plan: what every script derives from its privacy flags ---------------------------------------

def dp_sgd_plan(*, target_eps, n, batch_size, steps, delta=None, prior=None):
    """Turn a script's privacy flags into the numbers its DP-SGD run uses, checking them on the way.

    n examples, an expected logical batch of batch_size, `steps` logical steps: q = batch_size / n (Poisson
    sampling), delta = 1 / (2n) unless given (it must be < 1/n: a larger delta allows a mechanism that publishes
    one whole example outright), and sigma = calibrate_sigma(...) so that eps <= target_eps. target_eps = inf is
    the non-private reference: sigma = 0 (the accountant then reports eps = inf), q and delta as above.
    prior: an RDPAccountant state_dict of earlier DP runs on the same data (see init_prior); sigma is then
    calibrated so that the composed eps, theirs and this run's, is <= target_eps ("prior_eps" is theirs alone).
    Returns {"q", "sigma", "delta", "n", "steps", "batch_size", "prior_eps"}; bad values raise a one-line
    ValueError.

    >>> p = dp_sgd_plan(target_eps=3.0, n=60000, batch_size=256, steps=14063)
    >>> p["q"] == 256 / 60000, p["delta"] == 1 / 120000, round(p["sigma"], 3)
    (True, True, 1.019)
    """
    non_private = target_eps == math.inf  # --eps inf: the reference run without DP, same q; sigma 0 means eps inf
    target_eps = target_eps if non_private else _check_eps(target_eps)
    steps = _check_steps(steps)
    if not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"the dataset must hold at least one example, got N={n}")
    if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"--batch-size must be a whole number >= 1, got {batch_size}")
    if batch_size > n:
        raise ValueError(f"--batch-size {batch_size} is larger than the data (N={n})")
    if steps < 1:
        raise ValueError(f"--steps must be >= 1, got {steps}")
    delta = 1 / (2 * n) if delta is None else _check_delta(delta)
    if delta >= 1 / n:
        raise ValueError(f"--delta {delta:g} must be < 1/N = {1 / n:.3g} (N={n})")
    q = batch_size / n
    prior_rdp, prior_eps = None, 0.0
    if prior is not None:
        earlier = RDPAccountant()
        earlier.load_state_dict(prior)
        earlier.orders, earlier._rdp_cache = DEFAULT_ORDERS, {}  # re-evaluate its history on this run's orders
        prior_rdp = earlier.rdp()
        prior_eps = _eps_and_order(prior_rdp, DEFAULT_ORDERS, delta)[0] if prior_rdp.any() else 0.0
    sigma = 0.0 if non_private else calibrate_sigma(target_eps=target_eps, q=q, steps=steps, delta=delta,
                                                    prior_rdp=prior_rdp)
    return {"q": q, "sigma": sigma, "delta": delta, "n": int(n), "steps": steps, "batch_size": int(batch_size),
            "prior_eps": prior_eps}


def noise_to_signal(*, sigma, trained, units, mult=1):
    """A DP-SGD step's noise/signal budget, known before the first step: mult * sigma * sqrt(d) / K.

    Each step adds Gaussian noise of norm about mult * sigma * C * sqrt(d) (d trained parameters; mult = 1, or 2 for
    clip_dp.py's micro-batches of sensitivity 2C) to a sum of K clipped units (examples, or micro-batches), whose
    norm is at most K * C, reached only when every unit points the same way. So this ratio is the best case: near 1
    or above, the noise drowns even perfectly aligned gradients and the run cannot learn much, whatever the
    learning rate; at about 0.2 or below a run tracks its --eps inf ceiling. The levers are K (a larger expected
    batch), d (train fewer parameters, from a public initialisation) and sigma (a larger N at the same batch).
    Real per-example gradients disagree, so the real signal is smaller than K * C: scripts log the norm of the
    average clipped gradient with --log-private (it reads the private data). sigma = 0 (--eps inf) gives 0.

    >>> round(noise_to_signal(sigma=0.5, trained=40_000, units=1_000), 3)
    0.1
    >>> noise_to_signal(sigma=0.6, trained=90_000, units=1_024, mult=2)  # 2 * 0.6 * 300 / 1024
    0.3515625
    """
    if not (isinstance(trained, (int, np.integer)) and trained >= 1 and units > 0 and mult > 0 and sigma >= 0):
        raise ValueError(f"noise_to_signal needs d >= 1, K > 0, mult > 0, sigma >= 0; got d={trained}, K={units}, "
                         f"mult={mult}, sigma={sigma}")
    return mult * sigma * math.sqrt(trained) / units


def noise_budget(*, sigma, trained, units, mult=1):
    """noise_to_signal as every script prints and saves it before training: ({"trained_parameters", "units_per_step",
    "sigma", "mult", "ratio"}, one line saying what the ratio means)."""
    ratio = noise_to_signal(sigma=sigma, trained=trained, units=units, mult=mult)
    times = f" x {mult:g} (sensitivity {mult:g}C)" if mult != 1 else ""
    if ratio == 0:
        verdict = "no noise (--eps inf)"
    elif ratio >= 1:
        verdict = ("ABOVE 1: the noise drowns even perfectly aligned gradients, this run cannot learn much (raise the "
                   "batch, train fewer parameters, or add data)")
    else:
        verdict = "the noise over the best-case signal; near 1 a run cannot learn, at ~0.2 it tracks its ceiling"
    line = (f"noise/signal budget: d={trained:,} trained parameters, K={units:,.0f} clipped units per step, "
            f"sigma={sigma:.4f}{times}: {mult:g}*sigma*sqrt(d)/K = {ratio:.3f}, {verdict}")
    return dict(trained_parameters=int(trained), units_per_step=units, sigma=sigma, mult=mult, ratio=ratio), line


def init_prior(checkpoint, *, path, disjoint=False):
    """What starting from an earlier run's weights (`--init PATH`) costs this run (rule 4: eps composes over every
    DP run that touched the same data). checkpoint: the loaded file. Returns {"prior", "note", "pipeline"}: prior
    is the earlier runs' RDPAccountant state_dict to compose with (None: nothing to compose), note says why in one
    line, pipeline lists the earlier DP runs whose eps this run's now includes.

    - a file with no privacy record (a ViP-Syn cache, a random-process prior: public data) costs nothing;
    - a DP run of this project (its "privacy" record, or the "accountant" of an older checkpoint) composes,
      unless the user declares its data disjoint from this run's (disjoint=True, `--init-data-disjoint`);
    - a non-private run (`--eps inf`, `--debug-no-noise`, `--insecure-seed`: its record says "private": false and
      why) protects nothing: refused unless its data is declared disjoint.
    """
    record = checkpoint.get("privacy") if isinstance(checkpoint, dict) else None
    if record is None and isinstance(checkpoint, dict) and "accountant" in checkpoint:  # an older checkpoint
        record = {"private": True, "accountant": checkpoint["accountant"], "pipeline": [{"file": str(path)}]}
    if record is None:
        return dict(prior=None, note=f"--init {path}: public weights (no privacy record): cost no privacy",
                    pipeline=[])
    # a record of the wrong shape could pass for a private run (any truthy "private") or break the release later
    if not (isinstance(record, dict) and isinstance(record.get("private", True), bool)
            and isinstance(record.get("accountant"), dict) and isinstance(record.get("pipeline", []), list)
            and all(isinstance(p, dict) for p in record.get("pipeline", []))
            and isinstance(record.get("not_private_reason") or "", str)):
        raise ValueError(f"--init {path}: its privacy record is not one this project writes (private, accountant, "
                         f"pipeline of the wrong types)")
    if not record.get("private", True):
        why = record.get("not_private_reason") or "--eps inf"
        if not disjoint:
            raise ValueError(f"--init {path} comes from a NOT private run ({why}), which protects nothing; "
                             f"pass --init-data-disjoint only if it trained on data disjoint from this run's")
        return dict(prior=None, note=f"--init {path}: a NOT private run ({why}) on data declared disjoint from "
                    "this run's (--init-data-disjoint)", pipeline=[])
    earlier = RDPAccountant()
    try:
        earlier.load_state_dict(record["accountant"])  # checks it
    except ValueError as e:
        raise ValueError(f"--init {path}: its privacy record's accountant is {e}") from None
    if disjoint:
        return dict(prior=None, note=f"--init {path}: a DP run on data declared disjoint from this run's "
                    "(--init-data-disjoint): its eps is not composed", pipeline=[])
    return dict(prior=earlier.state_dict(), note=f"--init {path}: a DP run on the same data: its eps composes "
                "with this run's", pipeline=list(record.get("pipeline", [])))


# --- the accountant a training run carries -----------------------------------------------------------------------

class RDPAccountant:
    """Composes heterogeneous steps of the Poisson-subsampled Gaussian (RDP adds up, Mironov 2017, Prop. 1).

    history is a list of (q, sigma, steps) phases in plain Python types; consecutive steps with the same (q, sigma)
    merge into one phase, so a run of 100k steps is one entry.

    >>> acc = RDPAccountant()
    >>> acc.step(q=0.01, sigma=1.0, steps=100); acc.step(q=0.01, sigma=1.0); acc.step(q=0.02, sigma=2.0)
    >>> acc.history
    [(0.01, 1.0, 101), (0.02, 2.0, 1)]
    """

    def __init__(self, *, orders=DEFAULT_ORDERS):
        self.orders = _check_orders(orders)
        self.history = []
        self._rdp_cache = {}

    def step(self, *, q, sigma, steps=1):
        q, sigma, steps = _check_q(q), _check_sigma(sigma), _check_steps(steps)
        if steps == 0:
            return
        if self.history and self.history[-1][:2] == (q, sigma):
            self.history[-1] = (q, sigma, self.history[-1][2] + steps)
        else:
            self.history.append((q, sigma, steps))

    def rdp(self):
        """Total RDP at each of self.orders."""
        total = np.zeros(self.orders.shape)
        for q, sigma, steps in self.history:
            if (q, sigma) not in self._rdp_cache:
                self._rdp_cache[(q, sigma)] = rdp_subsampled_gaussian(q=q, sigma=sigma, orders=self.orders)
            total += steps * self._rdp_cache[(q, sigma)]
        return total

    def get_epsilon_and_order(self, delta):
        """(eps, best order) of everything stepped so far."""
        return epsilon_from_rdp(rdp=self.rdp(), orders=self.orders, delta=delta)

    def epsilon(self, delta):
        return self.get_epsilon_and_order(delta)[0]

    def state_dict(self):
        return {"history": [[q, sigma, steps] for q, sigma, steps in self.history],
                "orders": [float(a) for a in self.orders]}

    def load_state_dict(self, state):
        try:
            history = [(float(q), float(sigma), int(steps)) for q, sigma, steps in state["history"]]
            orders = state.get("orders", DEFAULT_ORDERS)
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"not an RDPAccountant state_dict ({e})") from None
        for q, sigma, steps in history:
            _check_q(q), _check_sigma(sigma), _check_steps(steps)
        self.orders, self.history, self._rdp_cache = _check_orders(orders), history, {}


# --- checking the claim: a one-run privacy audit (Steinke, Nasr & Jagielski, NeurIPS 2023) ---------------------
# m canaries each join the training data with an independent fair coin S_i. After training, an auditor who sees
# the run's outputs guesses S_i for r of them (abstaining on the rest); v guesses are right. If the run is
# (eps, delta)-DP, v cannot be much larger than for randomised response: P[v' >= v] <= p-value below
# (their Sec. 5 and the algorithm of their Appendix D). A small p-value rejects "the run is (eps, delta)-DP";
# the largest eps so rejected at the stated confidence is an empirical LOWER bound on the true eps. It can only
# catch a claim that is wrong, never prove one right, and it is capped: with r guesses all right it cannot exceed
# about log(r / log(1 / (1 - confidence))), and the delta term 2 m delta limits how many canaries help.

def _log_binom_pmf(k, n, p):
    """log P[Binomial(n, p) = k] for an array of k (0 <= k <= n, 0 < p < 1)."""
    k = np.asarray(k, dtype=np.float64)
    lgam = np.vectorize(math.lgamma)
    return lgam(n + 1.0) - lgam(k + 1) - lgam(n - k + 1) + k * math.log(p) + (n - k) * math.log1p(-p)


def audit_p_value(*, m, guesses, correct, eps, delta):
    """P-value of "the run is (eps, delta)-DP" after `correct` right guesses out of `guesses`, m canaries.

    p = beta + 2 m delta alpha, with p_eps = e^eps / (1 + e^eps) (the accuracy of eps-DP randomised response),
    beta = P[Bin(r, p_eps) >= v] and alpha = max_{1 <= i <= v} P[v - i <= Bin(r, p_eps) < v] / i."""
    m, r, v = int(m), int(guesses), int(correct)
    if not 0 <= v <= r <= m:
        raise ValueError(f"audit: need 0 <= correct <= guesses <= m, got {v}, {r}, {m}")
    if not eps >= 0:
        raise ValueError(f"audit: eps must be >= 0, got {eps}")
    if not 0 <= delta <= 1:
        raise ValueError(f"audit: delta must be in [0, 1], got {delta}")
    if v == 0:
        return 1.0
    p_eps = 1.0 / (1.0 + math.exp(-eps))
    if p_eps >= 1.0:  # eps so large that randomised response is always right
        return 1.0
    log_pmf = _log_binom_pmf(np.arange(r + 1), r, p_eps)  # k = 0 .. r
    pmf = np.exp(log_pmf - log_pmf.max()) * math.exp(log_pmf.max())
    beta = float(np.exp(np.logaddexp.reduce(log_pmf[v:])))  # P[Bin >= v]
    below = np.cumsum(pmf[:v][::-1])  # below[i - 1] = P[v - i <= Bin < v], i = 1 .. v
    alpha = float((below / np.arange(1, v + 1)).max())
    return min(1.0, beta + alpha * delta * 2 * m)


def audit_epsilon_lower_bound(*, m, guesses, correct, delta, confidence=0.95):
    """The largest eps that `correct` right guesses out of `guesses` (m canaries) reject at `confidence`:
    the run is NOT (eps', delta)-DP for any eps' below it, with probability >= confidence. 0 if none."""
    if not 0 < confidence < 1:
        raise ValueError(f"audit: confidence must be in (0, 1), got {confidence}")
    level = 1 - confidence
    p = lambda e: audit_p_value(m=m, guesses=guesses, correct=correct, eps=e, delta=delta)
    if p(0.0) >= level:
        return 0.0
    lo, hi = 0.0, 1.0  # p(lo) < level <= p(hi); the p-value grows with eps
    while p(hi) < level:
        lo, hi = hi, 2 * hi
    for _ in range(50):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if p(mid) < level else (lo, mid)
    return lo


class CanaryAudit:
    """White-box one-run audit of a DP-SGD run with gradient canaries (the white-box setting of Steinke et al. 2023).

    Canary i is a unit of the data (an example, or in clip_dp.py a micro-batch) whose gradient is a fixed vector of
    norm `strength` x C (larger than C, so it is clipped like any real gradient) along its own coordinate, one that
    no real example's gradient touches. Each canary joins the data with a fair coin. The joined canaries are data
    set indices N, N + 1, ... of the run's own Poisson sampler (data.poisson_batches): their coins come from the
    same call and generator as the real examples', at the same q. The script's own dp_step clips their rows with the
    same clip_and_sum as the examples' rows, then sums and noises them with the real examples.

    flip=False (per-example clipping): a sampled canary adds a row strength x C e_i, which moves the clipped sum by
    C, the sensitivity of the noise sigma C. flip=True (clip_dp.py, noise sigma 2C): each canary is a micro-batch of
    its own, present at every step, whose gradient is -strength x C e_i, and +strength x C e_i when the canary is
    sampled into it: joining flips its clipped vector from -C e_i to +C e_i, a move of 2C, the sensitivity clip_dp.py's
    noise is calibrated to. (Its micro-batch is its own rather than one of the K drawn at random: the clip_dp.py
    argument conditions on the micro-batch a pair joins, so any rule that ignores the other pairs is covered.)

    The auditor sees the privatised gradients (what DP-SGD releases), scores canary i by the sum over steps of
    coordinate i, guesses "in" for the highest scores and abstains on the rest (a rule fixed before the run that
    never looks at the coins; see result), and audit_epsilon_lower_bound turns the count of right guesses into a
    lower bound on eps. The coins are a function of the seed (so a resumed run has the same canaries); their
    sampling is in the sampler's state, the scores in the checkpoint (state_dict).

    What it checks, and what it cannot: the noise actually added against the claimed sigma and the sensitivity
    (C, or 2C in clip_dp.py), the real sampler's rate and independence (canaries drawn every step or at a higher
    rate than q show), and clip_and_sum's factor (a missing clip leaves canaries at 10 C). It never runs the model:
    per-example gradients that mix examples (a batch statistic, an augmentation shared across examples) are
    invisible to it; so is clipping the sum instead of each row (that shrinks every canary's share, so the audit
    reads less, not more), and a leak outside the released gradients (the log, the time).
    """

    def __init__(self, m, *, seed, strength=10.0, flip=False, guess_fractions=(0.02, 0.1, 0.4)):
        if int(m) != m or m < 1:
            raise ValueError(f"--audit needs a number of canaries >= 1, got {m}")
        self.m, self.seed, self.strength, self.flip = int(m), int(seed), float(strength), bool(flip)
        self.guess_fractions = tuple(guess_fractions)
        self.included = np.random.default_rng([self.seed, 0]).random(self.m) < 0.5  # S_i
        self.scores = np.zeros(self.m)

    @property
    def n_included(self):
        return int(self.included.sum())

    def rows(self, sampled, clip):
        """The canary units' gradients of one step, before clipping: float32 (units, m), each row along one canary's
        own coordinate. sampled: the joined canaries this step's Poisson sample drew, numbered 0 .. n_included - 1
        in the order they joined (data.poisson_batches). flip=False: one row per sampled canary, strength x C
        (one zero row if none is).
        flip=True: one row per canary, all m of them at every step: -strength x C, +strength x C if sampled."""
        ids = np.flatnonzero(self.included)[np.asarray(sampled, dtype=np.int64).reshape(-1)]  # canary numbers i
        if self.flip:
            out = np.zeros((self.m, self.m), dtype=np.float32)
            sign = np.full(self.m, -1.0)
            sign[ids] = 1.0
            out[np.arange(self.m), np.arange(self.m)] = sign * self.strength * clip
            return out
        out = np.zeros((max(1, len(ids)), self.m), dtype=np.float32)  # no canary sampled: one zero row, which
        out[np.arange(len(ids)), ids] = self.strength * clip  # adds nothing (clipping cannot make a row of 0 long)
        return out

    def observe(self, released):
        """released: (m,) the privatised gradient's canary coordinates at one step."""
        self.scores += np.asarray(released, dtype=np.float64).reshape(self.m)

    def result(self, *, delta, claimed_eps, confidence=0.95):
        """The audit's verdict. The auditor makes three guess sets fixed in advance (the top 2%, 10% and 40% of
        scores guessed "in": few confident guesses suit a noisy run, many suit a broken one) and keeps the best
        bound; each is computed at confidence 1 - (1 - confidence) / 3, so the best of the three still holds at
        `confidence` (a union bound)."""
        order = np.argsort(-self.scores, kind="stable")  # highest score first
        level = 1 - (1 - confidence) / len(self.guess_fractions)
        tries = []
        for f in self.guess_fractions:
            r = max(1, int(round(f * self.m)))
            v = int(self.included[order[:r]].sum())
            tries.append({"guesses": r, "correct": v, "eps_lower_bound": audit_epsilon_lower_bound(
                m=self.m, guesses=r, correct=v, delta=delta, confidence=level)})
        best = max(tries, key=lambda t: t["eps_lower_bound"])
        # every guess of the best set right: the bound is at its ceiling for that many guesses (about
        # log(guesses / 3)), as in a run with no noise at all, and a claim above it goes unchecked
        saturated = best["correct"] == best["guesses"]
        return {"canaries": self.m, "included": self.n_included, "confidence": confidence, "delta": delta,
                "eps_lower_bound": best["eps_lower_bound"], "claimed_eps": claimed_eps,
                "violation": best["eps_lower_bound"] > claimed_eps, "saturated": saturated, "guess_sets": tries}

    def state_dict(self):
        return {"m": self.m, "seed": self.seed, "scores": [float(s) for s in self.scores]}

    def load_state_dict(self, state):
        if state["m"] != self.m or state["seed"] != self.seed:
            raise ValueError("audit state does not match --audit/--seed of this run")
        self.scores = np.asarray(state["scores"], dtype=np.float64)


# --- argument checks: one-line ValueErrors ----------------------------------------------------------------------

def _real(name, x):
    try:
        x = float(x)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {x!r}") from None
    if math.isnan(x):
        raise ValueError(f"{name} must be a number, got nan")
    return x


def _check_q(q):
    q = _real("q", q)
    if not 0 <= q <= 1:
        raise ValueError(f"q (sampling rate) must be in [0, 1], got {q:g}")
    return q


SIGMA_RANGE = (1e-8, 1e100)  # outside it (0 and inf aside) the RDP sums overflow float64


def _check_sigma(sigma):
    sigma = _real("sigma", sigma)
    if sigma < 0:
        raise ValueError(f"sigma (noise multiplier) must be >= 0, got {sigma:g}")
    if sigma not in (0, math.inf) and not SIGMA_RANGE[0] <= sigma <= SIGMA_RANGE[1]:
        raise ValueError(f"sigma (noise multiplier) must be 0, inf or >= {SIGMA_RANGE[0]:g} and <= "
                         f"{SIGMA_RANGE[1]:g} (beyond, RDP overflows float64), got {sigma:g}")
    return sigma


def _check_delta(delta):
    delta = _real("delta", delta)
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta:g}")
    return delta


def _check_eps(eps):
    eps = _real("eps", eps)
    if not 0 < eps < math.inf:
        raise ValueError(f"eps must be > 0 and finite, got {eps:g}")
    return eps


MAX_STEPS = 10 ** 15  # steps times a step's RDP stays a float64 with room to spare


def _check_steps(steps):
    x = _real("steps", steps)
    if not (math.isfinite(x) and x >= 0 and x == int(x)):
        raise ValueError(f"steps must be a whole number >= 0, got {steps!r}")
    if x > MAX_STEPS:
        raise ValueError(f"steps must be <= {MAX_STEPS:.0e}, got {steps!r}")
    return int(x)


def _check_orders(orders):
    try:
        orders = np.asarray(orders, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        raise ValueError("orders must be a sequence of numbers > 1") from None
    if orders.size == 0 or not np.all(orders > 1) or not np.all(orders <= _MAX_ORDER):
        raise ValueError(f"orders must be a non-empty sequence of numbers in (1, {_MAX_ORDER}]")
    return orders


# --- command line ------------------------------------------------------------------------------------------------

class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit code 2 (argparse's default prints the usage block too)
        print(f"error: {message} (see --help)", file=sys.stderr)
        raise SystemExit(2)


def main(argv=None):
    p = _Parser(description="RDP accountant for DP-SGD with Poisson sampling: eps from sigma, or sigma from eps.")
    g = p.add_argument_group("privacy")
    mode = g.add_mutually_exclusive_group(required=True)
    mode.add_argument("--sigma", type=float, help="noise multiplier sigma: print the eps it gives")
    mode.add_argument("--eps", type=float, help="target eps: print the smallest sigma that reaches it")
    g.add_argument("--delta", type=float, default=None,
                   help="delta of the (eps, delta) guarantee; default 1/(2N) with --n, as in every script")
    g.add_argument("--q", type=float, default=None, help="sampling rate (or give --batch-size and --n)")
    g.add_argument("--steps", type=int, default=None, help="number of steps (or give --epochs)")
    d = p.add_argument_group("from the data set (instead of --q / --steps)")
    d.add_argument("--batch-size", type=int, default=None, help="expected logical batch B: q = B / N")
    d.add_argument("--n", type=int, default=None, help="data set size N")
    d.add_argument("--epochs", type=float, default=None, help="epochs E: steps = ceil(E N / B)")
    args = p.parse_args(argv)
    try:
        lo, hi = SIGMA_RANGE
        if args.sigma is not None and not (args.sigma == 0 or lo <= args.sigma <= hi):
            raise ValueError(f"--sigma must be 0 or >= {lo:g} and <= {hi:g} (beyond, RDP overflows float64), "
                             f"got {args.sigma:g}")
        if args.steps is not None and not 0 <= args.steps <= MAX_STEPS:
            raise ValueError(f"--steps must be >= 0 and <= {MAX_STEPS:.0e}, got {args.steps}")
        if (args.batch_size is None) != (args.n is None):
            raise ValueError("--batch-size and --n go together")
        if args.batch_size is not None:
            if args.q is not None:
                raise ValueError("give --q or --batch-size with --n, not both")
            if not 0 < args.batch_size <= args.n:
                raise ValueError(f"need 0 < --batch-size <= --n, got {args.batch_size} and {args.n}")
            args.delta = 1 / (2 * args.n) if args.delta is None else args.delta  # the scripts' default
            if args.delta >= 1 / args.n:  # as dp_sgd_plan refuses it: delta >= 1/N allows releasing an example
                raise ValueError(f"--delta {args.delta:g} must be < 1/N = {1 / args.n:.3g} (N={args.n}): give a "
                                 f"smaller --delta")
            args.q = args.batch_size / args.n
        if args.q is None:
            raise ValueError("give --q, or --batch-size with --n")
        if args.delta is None:
            raise ValueError("--q without --n: give --delta (with --n it defaults to 1/(2N), as in every script)")
        if args.steps is None:
            if args.epochs is None or args.batch_size is None:
                raise ValueError("give --steps, or --epochs with --batch-size and --n")
            if not 0 <= args.epochs <= MAX_STEPS * args.batch_size / args.n:
                raise ValueError(f"--epochs must be >= 0 and <= {MAX_STEPS * args.batch_size / args.n:.3g} (steps = "
                                 f"ceil(E N / B) <= {MAX_STEPS:.0e}), got {args.epochs:g}")
            args.steps = math.ceil(args.epochs * args.n / args.batch_size)
        elif args.epochs is not None:
            raise ValueError("give --steps or --epochs, not both")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if args.sigma is not None:
                acc = RDPAccountant()
                acc.step(q=args.q, sigma=args.sigma, steps=args.steps)
                eps, order = acc.get_epsilon_and_order(args.delta)
                print(f"eps = {eps:.4f} at delta = {args.delta:g} (best order {order:g}; "
                      f"q = {args.q:.6g}, sigma = {args.sigma:g}, steps = {args.steps})")
            else:
                sigma = calibrate_sigma(target_eps=args.eps, q=args.q, steps=args.steps, delta=args.delta)
                eps = epsilon(q=args.q, sigma=sigma, steps=args.steps, delta=args.delta)
                print(f"sigma = {sigma:.4f} gives eps = {eps:.4f} <= {args.eps:g} at delta = {args.delta:g} "
                      f"(q = {args.q:.6g}, steps = {args.steps})")
        for w in caught:
            print(f"warning: {w.message}", file=sys.stderr)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
