"""Completion-length profiles: parsing, the spec round trip, and the W1 draw."""

from __future__ import annotations

import statistics

import pytest

from grail_pipeline.common.errors import UserError
from grail_pipeline.mining.lengths import W1_SPEC, LengthProfile, _unit_interval, parse_length_profile


@pytest.mark.parametrize("spec", [W1_SPEC, "lognormal:100:0.25:1:4096", "lognormal:5:0:5:5", "lognormal:400:1:32:1024",
                                  "lognormal:400:0.123456789:32:1024", "lognormal:400:9.99999999:32:1024",
                                  "lognormal:7:1e-07:1:9", "fixed:1", "fixed:20", "natural"])
def test_spec_round_trip(spec) -> None:
    profile = parse_length_profile(spec)
    assert parse_length_profile(profile.spec) == profile
    assert parse_length_profile(profile.spec).spec == profile.spec


def test_specs_print_as_written() -> None:
    assert parse_length_profile(W1_SPEC).spec == W1_SPEC == "lognormal:400:0.5:32:1024"
    assert parse_length_profile(" fixed:20 ").spec == "fixed:20"
    assert parse_length_profile("lognormal:400:1.0:32:1024").spec == "lognormal:400:1:32:1024"
    assert parse_length_profile("natural").spec == "natural"


def test_parsed_fields() -> None:
    assert parse_length_profile(W1_SPEC) == LengthProfile("lognormal", median=400, sigma=0.5, minimum=32, maximum=1024)
    assert parse_length_profile("fixed:20") == LengthProfile("fixed", median=20, minimum=20, maximum=20)
    assert parse_length_profile("natural") == LengthProfile("natural")


@pytest.mark.parametrize("spec, words", [
    ("", "expected lognormal"),
    ("weird", "expected lognormal"),
    ("Natural", "expected lognormal"),
    ("natural:5", "expected lognormal"),
    ("fixed", "expected lognormal"),
    ("fixed:", "invalid literal"),
    ("fixed:0", "length must be positive"),
    ("fixed:-3", "length must be positive"),
    ("fixed:1.5", "invalid literal"),
    ("fixed:20:30", "expected lognormal"),
    ("lognormal:400:0.5:32", "expected lognormal"),
    ("lognormal:400:0.5:32:1024:9", "expected lognormal"),
    ("lognormal:x:0.5:32:1024", "invalid literal"),
    ("lognormal:400:0.5:500:1024", "need 1 <= MIN <= MEDIAN <= MAX"),
    ("lognormal:400:0.5:32:300", "need 1 <= MIN <= MEDIAN <= MAX"),
    ("lognormal:400:0.5:0:1024", "need 1 <= MIN"),
    ("lognormal:400:-0.1:32:1024", "0 <= SIGMA < 10"),
    ("lognormal:400:10:32:1024", "0 <= SIGMA < 10"),
    ("lognormal:400:nan:32:1024", "0 <= SIGMA < 10"),
    ("lognormal:400:inf:32:1024", "0 <= SIGMA < 10"),
])
def test_bad_specs_are_user_errors(spec, words) -> None:
    with pytest.raises(UserError, match="bad length profile") as err:
        parse_length_profile(spec)
    assert words in str(err.value) and "\n" not in str(err.value)


def test_targets_are_deterministic_and_within_bounds() -> None:
    profile = parse_length_profile("lognormal:60:1.5:10:200")  # wide: both bounds are hit
    seen = []
    for seed in range(300):
        targets = profile.targets(seed, 16)
        assert targets == profile.targets(seed, 16) == [profile.target(seed, i) for i in range(16)]
        assert all(isinstance(t, int) and 10 <= t <= 200 for t in targets)
        seen += targets
    assert min(seen) == 10 and max(seen) == 200 and len(set(seen)) > 100
    assert profile.targets(1, 16) != profile.targets(2, 16)
    assert profile.longest == 200
    # pinned values: the draw must not change between versions or machines (sha256, not Python's hash)
    assert parse_length_profile(W1_SPEC).targets(0, 4) == W1_FIRST_TARGETS


W1_FIRST_TARGETS = [115, 815, 643, 368]


def test_w1_median_is_400() -> None:
    profile = parse_length_profile(W1_SPEC)
    draws = [profile.target(seed, i) for seed in range(1250) for i in range(16)]  # 20 000 draws
    assert abs(statistics.median(draws) - 400) <= 8  # within 2 %
    assert 32 <= min(draws) and max(draws) <= 1024
    clipped = sum(d == 1024 for d in draws) / len(draws)
    assert 0.02 < clipped < 0.04  # P(z > ln(1024/400)/0.5 = 1.88) = 3 %


def test_fixed_and_natural() -> None:
    fixed = parse_length_profile("fixed:20")
    assert fixed.targets(123, 16) == [20] * 16 and fixed.longest == 20
    natural = parse_length_profile("natural")
    assert natural.targets(123, 16) == [None] * 16 and natural.target(5, 5) is None and natural.longest is None


def test_unit_interval_is_open_and_uniform() -> None:
    values = [_unit_interval(seed, i) for seed in range(200) for i in range(16)]
    assert all(0 < v < 1 for v in values)
    assert abs(statistics.mean(values) - 0.5) < 0.02
    assert len(set(values)) == len(values)
