"""Alerting sensors: freshness transitions (stale / recovered) and failed runs, sent to the alert sink."""

import json

import dagster as dg
from dagster._core.definitions.freshness import FreshnessState  # not re-exported by dagster 1.13

from recsys_dagster.automation.alerts import Alert, sink_from_spec
from recsys_dagster.defs.shared import RecsysResource, user_error

STALE = {FreshnessState.WARN.value, FreshnessState.FAIL.value}


def freshness_transitions(previous: dict[str, str], current: dict[str, str]) -> list[Alert]:
    """Alerts for assets that became stale (WARN/FAIL) or recovered (back to PASS) since the last tick."""
    alerts = []
    for key, state in sorted(current.items()):
        before = previous.get(key)
        if state in STALE and before != state:
            alerts.append(
                Alert(
                    "stale",
                    key,
                    f"{key} is {state}: not materialized within its freshness window",
                    {"state": state, "previous": before},
                )
            )
        elif state == FreshnessState.PASS.value and before in STALE:
            alerts.append(
                Alert("recovered", key, f"{key} is fresh again", {"state": state, "previous": before})
            )
    return alerts


@dg.sensor(
    name="freshness_alerts",
    minimum_interval_seconds=60,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Sends an alert when an asset's freshness policy goes WARN/FAIL, and when it recovers.",
)
def freshness_alerts(context: dg.SensorEvaluationContext, recsys: RecsysResource) -> dg.SkipReason:
    if context.repository_def is None:  # Dagster always passes it when it evaluates the sensor
        raise dg.DagsterInvariantViolationError("freshness_alerts needs the definitions it belongs to")
    graph = context.repository_def.asset_graph
    keys = [node.key for node in graph.asset_nodes if node.freshness_policy_or_from_metadata is not None]
    records = context.instance.get_freshness_state_records(keys)
    current = {key.to_user_string(): records[key].freshness_state.value for key in keys if key in records}
    previous = json.loads(context.cursor) if context.cursor else {}
    sink = sink_from_spec(recsys.settings.alert_sink, recsys.settings.home)
    alerts = freshness_transitions(previous, current)
    for alert in alerts:
        sink.send(alert)
    context.update_cursor(json.dumps(current, sort_keys=True))
    stale = sorted(k for k, s in current.items() if s in STALE)
    return dg.SkipReason(f"{len(alerts)} alert(s) sent; stale now: {', '.join(stale) or 'none'}")


@dg.run_failure_sensor(
    name="run_failure_alerts",
    minimum_interval_seconds=30,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Sends an alert for every failed run, naming the failed steps and their errors.",
)
def run_failure_alerts(context: dg.RunFailureSensorContext, recsys: RecsysResource) -> None:
    run = context.dagster_run
    steps = {}
    for event in context.get_step_failure_events():
        error = user_error(event.step_failure_data.error)
        steps[event.step_key] = error.message.strip().splitlines()[-1] if error else "unknown error"
    partition = run.tags.get("dagster/partition") or "-".join(
        filter(
            None,
            [
                run.tags.get("dagster/asset_partition_range_start"),
                run.tags.get("dagster/asset_partition_range_end"),
            ],
        )
    )
    # Without a failed step the run's failure message says why (a killed process, a start timeout).
    reasons = steps or {"reason": context.failure_event.message or "unknown"}
    alert = Alert(
        "run_failure",
        run.job_name,
        f"run {run.run_id} of {run.job_name} failed"
        + (f" (partition {partition})" if partition else "")
        + "".join(f"; {step}: {message}" for step, message in reasons.items()),
        {"run_id": run.run_id, "partition": partition, "failed_steps": steps},
    )
    sink_from_spec(recsys.settings.alert_sink, recsys.settings.home).send(alert)


def build_sensors() -> dg.Definitions:
    return dg.Definitions(sensors=[freshness_alerts, run_failure_alerts])
