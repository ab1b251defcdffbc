"""Quality gates on an evaluation result: what a candidate must reach before it may be published.

The guarded models are the ones `guardrails.min_lift_over_popularity` names (`als`, `blend`); the
baseline is the model named `popularity`. With m = `guardrails.metric` (default nDCG) at the evaluated k,
each guarded model present in the result must reach four floors:

- `min_lift_over_popularity.<model>` = L: m on all users >= (1 + L) * popularity's m on all users
  (L is the relative lift (model - popularity) / popularity: 0 = as good as popularity);
- `min_cold_start_lift_over_popularity.<model>` = L: the same on the cold-start users;
- `max_relative_drop` = D: m on all users >= (1 - D) * the m recorded for the published version;
- `min_coverage_vs_popularity` = C: catalog coverage on all users >= C * popularity's coverage (a model
  that shows everyone the same few items covers no more of the catalog than popularity does).

A check whose value or reference is missing is skipped: a guarded model not in the result (its artifact
may not be built yet), a holdout without cold-start users, no published result, or one evaluated at
another k. A missing popularity baseline is an error, since no lift can be computed without it. The
defaults, and the measurements that chose them, are in docs/reference/configuration.md.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from recsys_core.settings import GuardrailsConfig, ModelLifts
from recsys_dagster.evaluation.evaluate import EvaluationResult
from recsys_dagster.evaluation.holdout import SEGMENT_ALL, SEGMENT_COLD_START

BASELINE_MODEL = "popularity"
GUARDED_MODELS = tuple(f.name for f in dataclasses.fields(ModelLifts))
_SEGMENT_NAMES = {SEGMENT_ALL: "all users", SEGMENT_COLD_START: "cold-start users"}


@dataclass(frozen=True)
class Violation:
    """One guardrail a model failed; `message` says what, by how much, and which key sets the limit."""

    rule: str  # the guardrails key, e.g. "min_lift_over_popularity.blend"
    model: str
    segment: str
    metric: str
    value: float
    threshold: float  # the value of that key
    message: str


def check_guardrails(
    result: EvaluationResult, published: EvaluationResult | None, config: GuardrailsConfig
) -> list[Violation]:
    """Every guardrail the result breaks (an empty list passes); none at all when disabled."""
    if not config.enabled:
        return []
    if BASELINE_MODEL not in result.metrics:
        raise ValueError(f"the evaluation has no {BASELINE_MODEL!r} baseline: models {list(result.models)}")
    comparable = published if published is not None and published.k == result.k else None
    metric = config.metric
    violations = []
    for model in (model for model in GUARDED_MODELS if model in result.metrics):
        before = comparable.value(model, SEGMENT_ALL, metric) if comparable else None
        floors = (
            _lift_floor(result, config, model, "min_lift_over_popularity", SEGMENT_ALL),
            _lift_floor(result, config, model, "min_cold_start_lift_over_popularity", SEGMENT_COLD_START),
            _Floor(
                rule="max_relative_drop",
                threshold=config.max_relative_drop,
                segment=SEGMENT_ALL,
                metric=metric,
                reference=None if before is None else (before, "the published version's"),
                ratio=1 - config.max_relative_drop,
            ),
            _Floor(
                rule="min_coverage_vs_popularity",
                threshold=config.min_coverage_vs_popularity,
                segment=SEGMENT_ALL,
                metric="coverage",
                reference=_baseline(result, SEGMENT_ALL, "coverage"),
                ratio=config.min_coverage_vs_popularity,
            ),
        )
        for floor in floors:
            value = result.value(model, floor.segment, floor.metric)
            if value is not None and floor.reference is not None and value < floor.ratio * floor.reference[0]:
                violations.append(floor.violation(result.k, model, value, floor.reference))
    return violations


@dataclass(frozen=True)
class _Floor:
    """The check value >= ratio * reference, set by the guardrails key `rule` (whose value is `threshold`)."""

    rule: str
    threshold: float
    segment: str
    metric: str
    reference: tuple[float, str] | None  # (value, whose), e.g. (0.05, "popularity's"); None: not checked
    ratio: float

    def violation(self, k: int, model: str, value: float, reference: tuple[float, str]) -> Violation:
        base, whose = reference
        message = (
            f"{model} {self.metric}@{k} ({_SEGMENT_NAMES.get(self.segment, self.segment)}) {value:.3f} is "
            f"{_compared(value, base)} {whose} {base:.3f}; guardrails.{self.rule} = {self.threshold}"
        )
        return Violation(self.rule, model, self.segment, self.metric, value, self.threshold, message)


def _lift_floor(
    result: EvaluationResult, config: GuardrailsConfig, model: str, section: str, segment: str
) -> _Floor:
    """The floor `<section>.<model>` = L: the model's metric >= (1 + L) * popularity's, in `segment`."""
    lift = getattr(getattr(config, section), model)
    return _Floor(
        rule=f"{section}.{model}",
        threshold=lift,
        segment=segment,
        metric=config.metric,
        reference=_baseline(result, segment, config.metric),
        ratio=1 + lift,
    )


def _baseline(result: EvaluationResult, segment: str, metric: str) -> tuple[float, str] | None:
    value = result.value(BASELINE_MODEL, segment, metric)
    return None if value is None else (value, f"{BASELINE_MODEL}'s")


def _compared(value: float, reference: float) -> str:
    """`38% below` / `4% above` (just `below` when the reference is 0)."""
    direction = "below" if value < reference else "above"
    if reference == 0:
        return direction
    return f"{abs(value - reference) / reference:.0%} {direction}"
