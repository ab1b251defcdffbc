"""The Dagster code location: settings from the environment, then one Definitions per domain of `defs/`.

Every package under `defs/` is a domain that exposes `build_defs(settings) -> dg.Definitions`; they are
found by walking the package, so a new domain adds a folder and touches no central file.
"""

import contextlib
import datetime as dt
import importlib
import pkgutil
import warnings
from collections.abc import Iterator

import dagster as dg

from recsys_core.settings import Settings, load_settings
from recsys_dagster import defs as domains
from recsys_dagster.defs.shared import ON_DEMAND_GROUP, RecsysResource
from recsys_dagster.run_queue import day_holding_executor

# The daily schedule runs at 02:00 UTC; a day without a successful materialization warns after 26 hours
# and fails after 30 (docs/operations.md has the SLO and runbooks).
DAILY_FRESHNESS = dg.FreshnessPolicy.time_window(
    warn_window=dt.timedelta(hours=26), fail_window=dt.timedelta(hours=30)
)


def domain_definitions(settings: Settings) -> list[dg.Definitions]:
    """`build_defs(settings)` of every domain package under `defs/`, in name order."""
    found = []
    for module in sorted(pkgutil.iter_modules(domains.__path__), key=lambda m: m.name):
        if module.ispkg:
            domain = importlib.import_module(f"{domains.__name__}.{module.name}")
            found.append(domain.build_defs(settings))
    return found


@contextlib.contextmanager
def _known_maturity_notices_ignored() -> Iterator[None]:
    """Ignore Dagster's notices about the two non-stable APIs the definitions use on purpose.

    Every partitioned asset runs a backfill range as one run (`backfill_policy`, beta), and the freshness
    policy is applied with `map_resolved_asset_specs` (preview). The notices are for whoever changes the
    definitions, not for the UI's log, `dg check defs` or the test output; any other one still shows.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=r"Parameter `backfill_policy` of function `asset`", category=dg.BetaWarning
        )
        warnings.filterwarnings(
            "ignore", message=r"Function `Definitions.map_resolved_asset_specs`", category=dg.PreviewWarning
        )
        yield


def _executor(name: str) -> dg.ExecutorDefinition:
    if name == "k8s":
        # Imported only here: the Kubernetes client is not needed by any other deployment.
        from dagster_k8s import k8s_job_executor

        return k8s_job_executor
    return dg.multiprocess_executor if name == "multiprocess" else dg.in_process_executor


def build_definitions() -> dg.Definitions:
    settings = load_settings()
    # In-process by default: on a small machine, a process per step costs more than most steps' work, and
    # the UI's runs then cost what the CLI's do. A deployment with the cores for it picks multiprocess, one
    # on Kubernetes may give each step its own pod. Whichever it is, a run's process holds the run's days
    # while it executes (recsys_dagster.run_queue).
    executor = day_holding_executor(_executor(settings.executor))
    with _known_maturity_notices_ignored():
        defs = dg.Definitions.merge(
            *domain_definitions(settings),
            dg.Definitions(resources={"recsys": RecsysResource()}, executor=executor),
        )
        return defs.map_resolved_asset_specs(
            func=lambda spec: (
                spec
                if spec.group_name == ON_DEMAND_GROUP
                else dg.apply_freshness_policy(spec, DAILY_FRESHNESS)
            )
        )


defs = build_definitions()
