import numpy as np
import pytest

from diffmorpher.reschedule import reschedule_alphas, uniform_alphas


def test_reschedule_inverts_a_synthetic_distance_curve():
    # Perceptual progress p(alpha) = alpha**2 (slow start, fast end). Distances between
    # uniformly spaced frames follow it; the rescheduled alphas must be p^-1 of even levels.
    alphas = uniform_alphas(65)
    progress = np.asarray(alphas) ** 2
    distances = np.diff(progress)
    new = reschedule_alphas(alphas, distances.tolist(), num_frames=9)
    expected = np.sqrt(np.linspace(0, 1, 9))
    assert new[0] == 0.0 and new[-1] == 1.0
    assert np.max(np.abs(np.asarray(new) - expected)) < 0.02
    # The new frames are evenly spaced in progress.
    assert np.ptp(np.diff(np.asarray(new) ** 2)) < 0.01


def test_reschedule_of_even_distances_is_identity():
    alphas = uniform_alphas(5)
    assert np.allclose(reschedule_alphas(alphas, [0.1] * 4), alphas)


def test_reschedule_with_no_change_keeps_uniform_alphas():
    alphas = uniform_alphas(4)
    assert np.allclose(reschedule_alphas(alphas, [0.0, 0.0, 0.0]), alphas)


def test_reschedule_jump_concentrates_frames_around_it():
    alphas = uniform_alphas(5)
    new = reschedule_alphas(alphas, [0.01, 1.0, 0.01, 0.01])
    assert all(0.25 <= a <= 0.5 for a in new[1:4][:2])
    assert list(new) == sorted(new)


def test_reschedule_rejects_bad_distances():
    with pytest.raises(ValueError):
        reschedule_alphas([0.0, 1.0], [0.1, 0.2])
    with pytest.raises(ValueError):
        reschedule_alphas([0.0, 0.5, 1.0], [0.1, float("nan")])
