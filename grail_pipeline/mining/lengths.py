"""Completion-length profiles, so that every engine generates the same amount of work.

Random-initialised models never stop on their own, so the standard workload (W1) gives each rollout a
target length drawn deterministically from (problem seed, rollout index); engines mask EOS before the
target and force it at the target. `natural` leaves stopping to the model (real weights).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from statistics import NormalDist

from grail_pipeline.common.errors import UserError

W1_SPEC = "lognormal:400:0.5:32:1024"


@dataclass(frozen=True)
class LengthProfile:
    """How long each completion is; `kind` is lognormal, fixed or natural."""

    kind: str
    median: int = 0
    sigma: float = 0.0
    minimum: int = 0
    maximum: int = 0

    @property
    def spec(self) -> str:
        if self.kind == "lognormal":
            sigma = f"{self.sigma:g}"
            if float(sigma) != self.sigma:  # :g keeps 6 digits; the spec must parse back to this profile
                sigma = repr(self.sigma)
            return f"lognormal:{self.median}:{sigma}:{self.minimum}:{self.maximum}"
        if self.kind == "fixed":
            return f"fixed:{self.median}"
        return "natural"

    @property
    def longest(self) -> int | None:
        """The largest target this profile can draw (None: up to the model)."""
        return None if self.kind == "natural" else self.maximum

    def target(self, problem_seed: int, rollout_index: int) -> int | None:
        """Completion length in tokens, EOS included; None when the model decides."""
        if self.kind == "natural":
            return None
        if self.kind == "fixed":
            return self.median
        z = NormalDist().inv_cdf(_unit_interval(problem_seed, rollout_index))
        length = round(math.exp(math.log(self.median) + self.sigma * z))
        return min(self.maximum, max(self.minimum, length))

    def targets(self, problem_seed: int, count: int) -> list[int | None]:
        return [self.target(problem_seed, i) for i in range(count)]


def _unit_interval(problem_seed: int, rollout_index: int) -> float:
    """A uniform draw in (0, 1) that is the same on every machine and Python version."""
    digest = hashlib.sha256(f"grail-pipeline-length|{problem_seed}|{rollout_index}".encode()).digest()
    return (int.from_bytes(digest[:7], "big") + 0.5) / float(1 << 56)


def parse_length_profile(spec: str) -> LengthProfile:
    """Parse `lognormal:MEDIAN:SIGMA:MIN:MAX`, `fixed:N` or `natural`; anything else is a user error."""
    parts = spec.strip().split(":")
    try:
        if parts == ["natural"]:
            return LengthProfile(kind="natural")
        if parts[0] == "fixed" and len(parts) == 2:
            n = int(parts[1])
            if n < 1:
                raise ValueError("length must be positive")
            return LengthProfile(kind="fixed", median=n, minimum=n, maximum=n)
        if parts[0] == "lognormal" and len(parts) == 5:
            median, sigma, lo, hi = int(parts[1]), float(parts[2]), int(parts[3]), int(parts[4])
            if not (1 <= lo <= median <= hi) or not (0 <= sigma < 10):
                raise ValueError("need 1 <= MIN <= MEDIAN <= MAX and 0 <= SIGMA < 10")
            return LengthProfile(kind="lognormal", median=median, sigma=sigma, minimum=lo, maximum=hi)
    except ValueError as exc:
        raise UserError(f"bad length profile '{spec}': {exc}") from None
    raise UserError(
        f"bad length profile '{spec}': expected lognormal:MEDIAN:SIGMA:MIN:MAX, fixed:N or natural"
    )
