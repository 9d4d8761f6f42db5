import math

import numpy as np

from lmpipe.baselines import bigram_loss, unigram_loss


def test_unigram_matches_hand_computation():
    train = np.array([0, 0, 1, 2])
    val = np.array([0, 3])
    # V = 4, N = 4: p(0) = 3/8, p(3) = 1/8
    expected = -(math.log(3 / 8) + math.log(1 / 8)) / 2
    assert math.isclose(unigram_loss(train, val, 4), expected)


def test_bigram_matches_hand_computation():
    train = np.array([0, 1, 0, 1, 2])  # pairs: (0,1) x2, (1,0), (1,2)
    val = np.array([0, 1, 1])  # pairs: (0,1), (1,1)
    V = 3
    p01 = (2 + 1) / (2 + V)  # c(0,·) = 2
    p11 = (0 + 1) / (2 + V)  # c(1,·) = 2, (1,1) unseen
    expected = -(math.log(p01) + math.log(p11)) / 2
    assert math.isclose(bigram_loss(train, val, V), expected)


def test_bigram_beats_unigram_on_structured_text_and_scales_to_large_vocab():
    rng = np.random.default_rng(0)
    # a deterministic cycle with 5% noise: bigram statistics are far more predictive
    seq = np.arange(20000) % 50
    noise = rng.random(seq.size) < 0.05
    seq[noise] = rng.integers(0, 50, noise.sum())
    assert bigram_loss(seq[:15000], seq[15000:], 50) < 0.5 * unigram_loss(
        seq[:15000], seq[15000:], 50
    )
    # sparse counting: a 10^6 vocabulary needs no V×V table
    assert math.isfinite(bigram_loss(seq[:15000], seq[15000:], 1_000_000))
    uni = unigram_loss(seq[:15000], seq[15000:], 50)
    assert math.isclose(uni, math.log(50), rel_tol=0.02)
