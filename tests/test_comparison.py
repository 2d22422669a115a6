"""The comparison loop's pieces: method specs and relative perplexity."""

import math

import pytest

from grape.comparison import Variant, relative_perplexity


@pytest.mark.parametrize(
    ("spec", "variant"),
    [
        ("grape", Variant("grape")),
        ("grape+merge", Variant("grape", merge=True)),
        ("grape+merge=average", Variant("grape", merge=True, merge_fit="average")),
        ("grape:entropy_floor=0.8,cost=reroute", Variant("grape", options={"entropy_floor": 0.8, "cost": "reroute"})),
        ("naee+merge:beam_width=4", Variant("naee", merge=True, options={"beam_width": 4})),
    ],
)
def test_specs_parse_and_label_round_trip(spec, variant):
    assert Variant.parse(spec) == variant
    assert Variant.parse(spec).label == spec


def test_relative_perplexity_is_the_geometric_mean_of_ratios():
    original = {"perplexity": {"docs": 10.0, "code": 20.0}}
    assert relative_perplexity({"perplexity": {"docs": 20.0, "code": 10.0}}, original) == pytest.approx(1.0)
    assert relative_perplexity({"perplexity": {"docs": 40.0, "code": 20.0}}, original) == pytest.approx(math.sqrt(4.0))
