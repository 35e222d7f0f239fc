"""Properties of the blend math, checked with hypothesis against plain numpy formulas."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from dera_gguf import blend_logits, kl_divergence, log_softmax, mixing_weights
from dera_gguf.blend import sweep_stats

finite = st.floats(-30, 30, allow_nan=False, width=32)
lams = st.floats(-5, 5, allow_nan=False)
vocab = st.integers(2, 40)


@st.composite
def logits_pair(draw):
    n = draw(vocab)
    return (draw(arrays(np.float32, n, elements=finite)), draw(arrays(np.float32, n, elements=finite)))


def softmax(z):
    e = np.exp(z - z.max())
    return e / e.sum()


@given(logits_pair(), lams)
def test_blend_is_the_weighted_sum(pair, lam):
    ref, aligned = pair
    got = blend_logits([ref, aligned], mixing_weights(lam))
    expected = (1 - lam) * ref.astype(np.float64) + lam * aligned.astype(np.float64)
    assert np.allclose(got, expected, rtol=1e-5, atol=1e-3)


@given(logits_pair())
def test_lam_0_and_1_are_the_models(pair):
    ref, aligned = pair
    assert np.array_equal(blend_logits([ref, aligned], mixing_weights(0.0)), ref)
    assert np.array_equal(blend_logits([ref, aligned], mixing_weights(1.0)), aligned)


@given(logits_pair(), lams, st.floats(-50, 50), st.floats(-50, 50))
def test_distribution_ignores_per_model_logit_shifts(pair, lam, c_ref, c_aligned):
    """softmax(blend) depends on each model only through its distribution (Proposition 1)."""
    ref, aligned = (x.astype(np.float64) for x in pair)
    w = mixing_weights(lam)
    a = softmax(blend_logits([ref, aligned], w).astype(np.float64))
    b = softmax(blend_logits([ref + c_ref, aligned + c_aligned], w).astype(np.float64))
    assert np.allclose(a, b, atol=1e-4)


@given(logits_pair(), lams)
def test_blend_is_a_normalised_geometric_mixture(pair, lam):
    """log p_lam = (1 - lam) log p_ref + lam log p_aligned - log Z: eq. (9) of the paper."""
    ref, aligned = (x.astype(np.float64) for x in pair)
    mixture = (1 - lam) * log_softmax(ref) + lam * log_softmax(aligned)
    expected = mixture - np.log(np.exp(mixture - mixture.max()).sum()) - mixture.max()
    got = log_softmax(blend_logits([ref, aligned], mixing_weights(lam)))
    assert np.allclose(got, expected, atol=1e-3)


@given(st.lists(lams, min_size=1, max_size=4))
def test_weights_sum_to_one(values):
    w = mixing_weights(values, len(values))
    assert w[1:].tolist() == values and abs(w.sum() - 1.0) < 1e-9


@given(logits_pair())
def test_kl_is_nonnegative_and_zero_on_itself(pair):
    p, q = pair
    assert kl_divergence(p, q) >= -1e-9
    assert abs(kl_divergence(p, p)) < 1e-9


@settings(max_examples=50)
@given(logits_pair(), lams)
def test_in_place_blend_equals_fresh(pair, lam):
    ref, aligned = (x.copy() for x in pair)
    fresh = blend_logits([ref, aligned], mixing_weights(lam))
    out = blend_logits([ref, aligned], mixing_weights(lam), out=aligned)
    assert out is aligned and np.array_equal(out, fresh)


def _float64_stats(ref, aligned, lam, token):
    """log p_lam(token) and KL(p_lam || p_ref) straight from the definitions, in float64."""
    z = ref.astype(np.float64) + lam * (aligned.astype(np.float64) - ref)
    lp, lr = log_softmax(z), log_softmax(ref)
    return lp[..., token], (np.exp(lp) * (lp - lr)).sum(-1)


@settings(max_examples=25, deadline=None)
@given(
    st.integers(1, 20),
    st.integers(2, 300),
    st.lists(st.floats(-3, 4, allow_nan=False), min_size=1, max_size=6),
    st.integers(0, 2**32 - 1),
)
def test_sweep_stats_equal_the_definitions(n_rows, n_vocab, lams, seed):
    rng = np.random.default_rng(seed)
    ref = rng.normal(0, 4, (n_rows, n_vocab)).astype(np.float32)
    aligned = (ref + rng.normal(0, 2, (n_rows, n_vocab))).astype(np.float32)
    tokens = rng.integers(0, n_vocab, n_rows)
    logp, kl = sweep_stats(ref, aligned, lams, tokens)
    for j, lam in enumerate(lams):
        for i in range(n_rows):
            want_lp, want_kl = _float64_stats(ref[i], aligned[i], lam, tokens[i])
            assert logp[j, i] == pytest.approx(want_lp, abs=1e-4)
            assert kl[j, i] == pytest.approx(want_kl, abs=1e-4, rel=1e-4)
    assert np.all(sweep_stats(ref, aligned, [0.0])[1] == 0.0)  # lam 0 is the reference itself


@given(logits_pair(), logits_pair())
def test_kl_equals_the_definition(p, q):
    n = min(len(p[0]), len(q[0]))
    zp, zq = p[0][:n], q[1][:n]
    lp, lq = log_softmax(zp), log_softmax(zq)
    assert kl_divergence(zp, zq) == pytest.approx((np.exp(lp) * (lp - lq)).sum(), abs=1e-4, rel=1e-4)
