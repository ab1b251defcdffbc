"""The Kubernetes deployment files (docs/how-to/kubernetes.md) name things that exist and load.

Without a cluster these are the checks that can fail: the Helm values and the API manifest parse, the code
location and the run coordinator they name import and accept their configuration, the settings they set are
documented ones, the API's command line and probes are ones `recsys serve` answers, and the `k8s` executor
loads with the definitions.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from dagster._config import process_config, resolve_to_config_type
from dagster._core.run_coordinator import QueuedRunCoordinator

from recsys_cli.cli import build_parser
from recsys_serving.app import create_app

ROOT = Path(__file__).resolve().parent.parent
VALUES = ROOT / "deploy" / "helm" / "values.yaml"
API_MANIFEST = ROOT / "deploy" / "kubernetes" / "recsys-api.yaml"
PYPROJECT = ROOT / "pyproject.toml"
CONFIGURATION_DOC = ROOT / "docs" / "reference" / "configuration.md"


@pytest.fixture(scope="module")
def values() -> dict:
    return yaml.safe_load(VALUES.read_text())


@pytest.fixture(scope="module")
def api_documents() -> list[dict]:
    return list(yaml.safe_load_all(API_MANIFEST.read_text()))


def _api_container(api_documents: list[dict]) -> dict:
    deployment = next(d for d in api_documents if d["kind"] == "Deployment")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container


def test_the_code_location_the_values_name_is_recsys_definitions(values: dict) -> None:
    (deployment,) = values["dagster-user-deployments"]["deployments"]
    args = deployment["dagsterApiGrpcArgs"]
    module = args[args.index("--module-name") + 1]
    # The module `dg check defs` and the compose stack's code server load.
    assert (
        module == tomllib.loads(PYPROJECT.read_text())["tool"]["dg"]["project"]["code_location_target_module"]
    )
    assert deployment["includeConfigInLaunchedRuns"]["enabled"] is True


def test_the_run_coordinator_the_values_name_loads_with_their_config(values: dict) -> None:
    coordinator = values["dagsterDaemon"]["runCoordinator"]
    assert coordinator["type"] == "CustomRunCoordinator"
    custom = coordinator["config"]["customRunCoordinator"]
    cls = getattr(importlib.import_module(custom["module"]), custom["class"])
    assert issubclass(cls, QueuedRunCoordinator)
    result = process_config(resolve_to_config_type(cls.config_type()), custom["config"])
    assert result.success, result.errors


def test_every_setting_the_files_set_is_a_documented_one(values: dict, api_documents: list[dict]) -> None:
    documented = set(re.findall(r"`(RECSYS_[A-Z0-9_]+)`", CONFIGURATION_DOC.read_text()))
    text = json.dumps(values) + json.dumps(api_documents)
    named = set(re.findall(r'"(RECSYS_[A-Z0-9_]+)"', text))
    assert named, "the files set no RECSYS_ variable"
    assert named <= documented, sorted(named - documented)


def test_the_api_command_and_probes_are_ones_recsys_serve_answers(api_documents: list[dict]) -> None:
    container = _api_container(api_documents)
    command = container["command"]
    assert command[0] == "recsys"
    args = build_parser().parse_args(command[1:])
    assert args.command == "serve"
    paths = {route.path for route in create_app().routes}
    assert container["readinessProbe"]["httpGet"]["path"] in paths
    assert container["livenessProbe"]["httpGet"]["path"] in paths
    service = next(d for d in api_documents if d["kind"] == "Service")
    assert service["spec"]["selector"] == api_documents[0]["spec"]["selector"]["matchLabels"]


def test_the_k8s_executor_runs_every_job_step_in_a_pod_of_its_own(tmp_path: Path) -> None:
    script = (
        "from recsys_dagster.definitions import defs\n"
        "print(sorted({job.executor_def.name for job in defs.resolve_all_job_defs()}))\n"
    )
    env = os.environ | {"RECSYS_HOME": str(tmp_path), "RECSYS_EXECUTOR": "k8s"}
    result = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300, check=True
    )
    assert result.stdout.strip() == "['k8s']"
