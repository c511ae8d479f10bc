"""wavefront.testing: rel_err never lets a NaN or an infinity pass a tolerance check."""
import math

import pytest
import torch

from wavefront.testing import assert_close, rel_err

NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("actual, expected", [
    ([1.0, NAN], [1.0, NAN]),      # NaN at the same place on both sides: still not a match
    ([1.0, 2.0], [1.0, NAN]),      # NaN only in the reference
    ([1.0, NAN], [1.0, 2.0]),      # NaN only in the result
    ([1.0, 2.0], [1.0, INF]),      # an infinite reference would make the scale inf and the error 0
    ([1.0, INF], [1.0, INF]),      # inf - inf is NaN
    ([1.0, -INF], [1.0, -INF]),
    ([1.0, INF], [1.0, 2.0]),      # an infinite result
    ([NAN, NAN], [NAN, NAN]),      # all NaN: nothing left to compare would read as 0
])
def test_a_non_finite_value_on_either_side_gives_an_infinite_error(actual, expected):
    err = rel_err(torch.tensor(actual), torch.tensor(expected))
    assert err == INF and not err <= 1e-3


def test_complex_non_finite_parts_count_too():
    assert rel_err(torch.tensor([1 + 1j]), torch.tensor([complex(1, INF)])) == INF
    assert rel_err(torch.tensor([complex(NAN, 1)]), torch.tensor([complex(NAN, 1)])) == INF


def test_assert_close_fails_on_a_nan_reference():
    with pytest.raises(AssertionError, match="relative error inf exceeds"):
        assert_close(torch.tensor([1.0, NAN]), torch.tensor([1.0, NAN]), rtol=1e-3)


def test_finite_inputs_keep_their_relative_error():
    assert math.isclose(rel_err(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 2.5])), 0.2)
    assert rel_err(torch.zeros(3), torch.zeros(3)) == 0.0
    assert rel_err(torch.tensor([1e-3]), torch.zeros(1)) == pytest.approx(1e-3)  # zero reference: absolute
    assert rel_err(torch.empty(0), torch.empty(0)) == 0.0


def test_shapes_must_match():
    with pytest.raises(ValueError, match=r"shapes differ: \(2,\) vs \(3,\)"):
        rel_err(torch.zeros(2), torch.zeros(3))
