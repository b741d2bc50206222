import numpy as np
import pytest
import torch

from ee_nas.thresholds.confidence import MEASURES, confidence


def test_two_class_by_hand():
    # softmax([0, ln 3]) = [0.25, 0.75]
    x = np.array([[0.0, np.log(3.0)]])
    assert confidence(x, "max_softmax") == pytest.approx([0.75])
    assert confidence(x, "margin") == pytest.approx([0.5])
    h = -(0.25 * np.log(0.25) + 0.75 * np.log(0.75))
    assert confidence(x, "entropy") == pytest.approx([1 - h / np.log(2)])


def test_three_class_by_hand():
    # softmax([ln 1, ln 2, ln 5]) = [0.125, 0.25, 0.625]
    x = np.log([[1.0, 2.0, 5.0]])
    assert confidence(x, "max_softmax") == pytest.approx([0.625])
    assert confidence(x, "margin") == pytest.approx([0.375])
    p = np.array([0.125, 0.25, 0.625])
    assert confidence(x, "entropy") == pytest.approx([1 + (p * np.log(p)).sum() / np.log(3)])


def test_entropy_extremes_and_range():
    assert confidence(np.array([[1000.0, 0.0, 0.0, 0.0]]), "entropy") == pytest.approx([1.0])
    assert confidence(np.zeros((1, 4)), "entropy") == pytest.approx([0.0], abs=1e-12)
    assert confidence(np.zeros((1, 4)), "margin") == pytest.approx([0.0], abs=1e-12)
    x = np.random.default_rng(0).normal(scale=5, size=(50, 3, 7))
    for m in MEASURES:
        c = confidence(x, m)
        assert c.shape == (50, 3) and np.all((c >= 0) & (c <= 1))


def test_stable_and_accepts_torch():
    x = np.array([[[1e4, 0.0, -1e4], [5.0, 5.0, 5.0]]])  # [N=1, K=2, C=3]
    c = confidence(torch.tensor(x), "max_softmax")
    assert isinstance(c, np.ndarray) and np.all(np.isfinite(c))
    np.testing.assert_allclose(c, [[1.0, 1 / 3]])


def test_unknown_measure_lists_valid_ones():
    with pytest.raises(ValueError, match="max_softmax.*entropy.*margin"):
        confidence(np.zeros((2, 3)), "temperature")
