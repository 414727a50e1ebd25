"""The answer scorers; the model-based ones (log-likelihoods, fidelity) are tested with the suites in test_evals."""

import math

import pytest

from saesteer.scoring import extract_final_number, mc1_correct, mc2_score, numbers_equal


@pytest.mark.parametrize(
    "reply, number",
    [
        ("so the answer is 42.", "42"),
        ("3 apples and 5 pears make 8", "8"),
        ("#### 1,234\nthanks 5", "1234"),
        ("It costs $18.50 in total.", "18.50"),
        ("-3 degrees", "-3"),
        ("no digits here", None),
    ],
)
def test_extract_final_number(reply, number):
    assert extract_final_number(reply) == number


def test_numbers_equal():
    assert numbers_equal("18.00", "18") and not numbers_equal("17", "18") and not numbers_equal(None, "1")


def test_mc1_mc2_known_answers():
    assert mc1_correct([-1.0, -2.0, -3.0], [1, 0, 0]) and not mc1_correct([-3.0, -2.0], [1, 0])
    # probabilities 0.5, 0.25, 0.25 -> mass on the two true answers 0.75
    assert mc2_score([math.log(0.5), math.log(0.25), math.log(0.25)], [1, 0, 1]) == pytest.approx(0.75)
