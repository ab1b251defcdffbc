"""Score ranking models on a holdout: every metric of `metrics`, per model and per user segment.

A model is a function `(user_id, k) -> ranked item ids`, best first (the pipeline passes rankers that
call the API server's ranking code). Each model is asked once for each evaluated user of the holdout,
in user order; its lists are then scored for every segment of the holdout ("all", "cold_start",
"active"). A segment without users has no metrics (its `users` count is 0). The result holds plain
numbers only, and the same models and holdout always give the same result and the same JSON.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from recsys_core.settings import RANKING_METRICS
from recsys_dagster.evaluation.holdout import Holdout
from recsys_dagster.evaluation.metrics import (
    DEFAULT_HEAD_SHARE,
    curve_ranks,
    popularity_head,
    score_users,
    training_share_by_rank,
)

Ranker = Callable[[str, int], Sequence[str]]

# Measures of the set of lists rather than means over users.
CATALOG_METRICS = ("coverage", "long_tail_share")
METRICS = (*RANKING_METRICS, *CATALOG_METRICS)


@dataclass(frozen=True)
class LongTailCurve:
    """Cumulative shares at item popularity ranks (1 = the most popular training item).

    `training[i]`: share of training interactions on items of rank <= ranks[i]; `models[m][i]`: share of
    model m's recommended slots (all evaluated users) on those items.
    """

    ranks: tuple[int, ...]
    training: tuple[float, ...]
    models: Mapping[str, tuple[float, ...]]


@dataclass(frozen=True)
class EvaluationResult:
    k: int
    catalog_size: int
    head_share: float
    # Items in the popularity head (metrics.popularity_head).
    head_size: int
    # Segment -> number of evaluated users in it.
    users: Mapping[str, int]
    # Model -> segment -> metric -> value; segments without users are left out.
    metrics: Mapping[str, Mapping[str, Mapping[str, float]]]
    long_tail: LongTailCurve

    @property
    def models(self) -> tuple[str, ...]:
        return tuple(self.metrics)

    def value(self, model: str, segment: str, metric: str) -> float | None:
        """One metric; None if the model was not evaluated or the segment had no users."""
        return self.metrics.get(model, {}).get(segment, {}).get(metric)

    def to_rows(self) -> list[dict[str, Any]]:
        """One row per model, segment and metric: {model, segment, metric, value, users}."""
        return [
            {
                "model": model,
                "segment": segment,
                "metric": metric,
                "value": value,
                "users": self.users[segment],
            }
            for model, segments in self.metrics.items()
            for segment, values in segments.items()
            for metric, value in values.items()
        ]

    def to_json(self) -> str:
        return json.dumps(
            {
                "k": self.k,
                "catalog_size": self.catalog_size,
                "head_share": self.head_share,
                "head_size": self.head_size,
                "users": dict(self.users),
                "metrics": {
                    m: {s: dict(v) for s, v in segments.items()} for m, segments in self.metrics.items()
                },
                "long_tail": {
                    "ranks": list(self.long_tail.ranks),
                    "training": list(self.long_tail.training),
                    "models": {m: list(shares) for m, shares in self.long_tail.models.items()},
                },
            },
            indent=1,
        )

    @classmethod
    def from_json(cls, text: str) -> EvaluationResult:
        """The result `to_json` wrote (for instance the one recorded for a published version)."""
        data = json.loads(text)
        curve = data["long_tail"]
        return cls(
            k=data["k"],
            catalog_size=data["catalog_size"],
            head_share=data["head_share"],
            head_size=data["head_size"],
            users=data["users"],
            metrics=data["metrics"],
            long_tail=LongTailCurve(
                ranks=tuple(curve["ranks"]),
                training=tuple(curve["training"]),
                models={m: tuple(shares) for m, shares in curve["models"].items()},
            ),
        )


def evaluate_models(
    models: Mapping[str, Ranker],
    holdout: Holdout,
    k: int,
    catalog_size: int,
    popularity: Mapping[str, float],
    head_share: float = DEFAULT_HEAD_SHARE,
) -> EvaluationResult:
    """Every metric at `k` of every model, per segment of `holdout`.

    `catalog_size` is the denominator of coverage (the number of items the models can recommend, e.g.
    the training catalog); `popularity` (training interactions per item, e.g. `item_popularity`) defines
    the popularity head of the long-tail share and the ranks of the long-tail curve.
    """
    users = sorted(holdout.held_out)
    head = popularity_head(popularity, head_share)
    ranks = curve_ranks(len(popularity))
    metrics: dict[str, dict[str, dict[str, float]]] = {}
    curves: dict[str, tuple[float, ...]] = {}
    for name, model in models.items():
        recommendations = {user: list(model(user, k)) for user in users}
        scores = score_users(recommendations, holdout.held_out, k)
        metrics[name] = {}
        for segment, members in holdout.segments.items():
            if not members:
                continue
            in_segment = scores.restricted_to(members)
            metrics[name][segment] = {metric: in_segment.mean(metric) for metric in RANKING_METRICS} | {
                "coverage": in_segment.lists.coverage(catalog_size),
                "long_tail_share": in_segment.lists.long_tail_share(head),
            }
        curves[name] = tuple(scores.lists.cumulative_share_by_rank(popularity, ranks))
    return EvaluationResult(
        k=k,
        catalog_size=catalog_size,
        head_share=head_share,
        head_size=len(head),
        users={segment: len(members) for segment, members in holdout.segments.items()},
        metrics=metrics,
        long_tail=LongTailCurve(tuple(ranks), tuple(training_share_by_rank(popularity, ranks)), curves),
    )
