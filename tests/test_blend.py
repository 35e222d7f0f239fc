"""Properties of the blend math, checked with hypothesis against plain numpy formulas."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from dera_gguf import blend_logits, kl_divergence, log_softmax, mixing_weights

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
