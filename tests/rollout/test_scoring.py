"""reward_fn output is validated with errors that name the sample and the value."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from rlora.rollout.scoring import validate_scores

LENGTHS = [3, 2, 4]


@pytest.mark.parametrize("scores", [[1, 2.5, -3], (0.0, 1.0, 2.0), np.array([1.0, 2.0, 3.0]),
                                    torch.tensor([1.0, 2.0, 3.0])], ids=["list", "tuple", "numpy", "tensor"])
def test_terminal_scores_accepted(scores):
    out = validate_scores(scores, LENGTHS)
    assert out.shape == (3,) and out.dtype == torch.float32
    assert out.tolist() == [float(x) for x in list(scores)]


@pytest.mark.parametrize("scores", [[True, False, 2], np.array([True, False, True]), [np.bool_(True), 0, 1.5]],
                         ids=["list", "numpy", "numpy-scalars"])
def test_bool_scores_count_one_and_zero_as_in_trl(scores):
    assert validate_scores(scores, LENGTHS).tolist() == [1.0, 0.0, float(scores[2])]


def test_dense_scores_padded_to_the_longest_response():
    out = validate_scores([[1, 2, 3], [4], []], LENGTHS)
    assert out.tolist() == [[1, 2, 3, 0], [4, 0, 0, 0], [0, 0, 0, 0]]


@pytest.mark.parametrize(
    "scores, match",
    [
        ([1.0, 2.0], r"returned 2 scores for 3 samples; return one score per sample"),
        ([1.0, math.nan, 2.0], r"returned nan for sample 1; every score must be a finite number"),
        ([1.0, 2.0, math.inf], r"returned inf for sample 2"),
        ([1.0, "good", 2.0], r"returned 'good' for sample 1"),
        ([1.0, None, 2.0], r"returned None for sample 1"),
        ([1.0, np.array([1.0, 2.0]), 2.0], r"returned array\(\[1., 2.\]\) for sample 1"),
        ([[1.0, 2.0, 3.0, 4.0], [1.0], [1.0]], r"4 per-token scores for sample 0, whose response has 3 tokens"),
        ([[1.0], 2.0, [1.0]], r"but 2.0 for sample 1"),
        ([[1.0], [float("nan")], [1.0]], r"nan at token 0 of sample 1"),
    ],
    ids=["count", "nan", "inf", "string", "none", "array", "dense-too-long", "mixed", "dense-nan"],
)
def test_bad_scores_name_the_sample_and_value(scores, match):
    with pytest.raises(ValueError, match=match):
        validate_scores(scores, LENGTHS)


def test_non_list_is_a_type_error():
    with pytest.raises(TypeError, match="returned float; return a list"):
        validate_scores(1.0, LENGTHS)
