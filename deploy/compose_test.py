"""`make compose-test`: build the images, start the compose stack, run the pipeline through it, tear it down.

Steps: a Docker engine (Debian's docker.io, docker-compose and debootstrap are installed with apt-get when
missing; `dockerd --bridge=none` is started when no daemon answers, and stopped at the end); a base image
built from Debian packages (no image registry is needed; cached under its tag); the images; the stack on free
ports of 127.0.0.1 under its own project name (a stack of `make up` is left alone); a few days of generated
events; a backfill launched through the webserver's GraphQL API as the UI launches one, run by the daemon;
both API replicas serving the manifest it published. The stack and its volumes are removed at the end,
also on failure. Standard library only: it runs before anything is installed.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPOSITORY = Path(__file__).resolve().parent.parent
PROJECT = "recsys-compose-test"
# The base image the test builds from Debian packages and hands to the Dockerfile as BASE_IMAGE.
BASE_IMAGE = "recsys-debian-base:bookworm-python3.11"
BASE_PACKAGES = "python3,python3-venv,ca-certificates"
SERVICES = ("postgres", "code-server", "webserver", "daemon", "api-1", "api-2")
PORT_VARIABLES = (
    "POSTGRES_PORT",
    "DAGSTER_CODE_SERVER_PORT",
    "DAGSTER_WEBSERVER_PORT",
    "API_1_PORT",
    "API_2_PORT",
)
TARGET, USER = "tenant=demo&surface=home", "u00002"
DAYS = 3
GENERATE = ("--days", str(DAYS), "--events-per-day", "2000", "--users", "200", "--items", "100")
# Terminal states of a backfill (Dagster's BulkActionStatus) and the one that means every partition succeeded.
BACKFILL_DONE = {"COMPLETED", "COMPLETED_SUCCESS", "COMPLETED_FAILED", "FAILED", "CANCELED"}
BACKFILL_SUCCEEDED = {"COMPLETED", "COMPLETED_SUCCESS"}

STARTED = time.monotonic()


class CheckFailed(Exception):
    """The stack did not do what the test expects; the message says what."""


def say(message: str) -> None:
    print(f"[compose-test {time.monotonic() - STARTED:6.1f}s] {message}", flush=True)


def run(*command: str, env: dict[str, str] | None = None, capture: bool = False) -> str:
    """Run a command, raising CheckFailed with its output if it fails; its standard output if captured."""
    result = subprocess.run(command, env=env, text=True, capture_output=capture, check=False)
    if result.returncode != 0:
        detail = f"\n{result.stdout}{result.stderr}" if capture else ""
        raise CheckFailed(f"`{' '.join(command)}` exited with {result.returncode}{detail}")
    return result.stdout if capture else ""


# -- the engine -------------------------------------------------------------------------------------------


def install_missing_tools() -> None:
    wanted = {"docker": "docker.io", "dockerd": "docker.io", "debootstrap": "debootstrap"}
    if not compose_command():
        wanted["docker-compose"] = "docker-compose"
    packages = sorted({package for tool, package in wanted.items() if shutil.which(tool) is None})
    if not packages:
        return
    if os.geteuid() != 0:
        raise CheckFailed(f"missing {', '.join(packages)}: install them (apt-get install) or run as root")
    say(f"installing {' '.join(packages)} with apt-get")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    run("apt-get", "update", "-qq", env=env)
    run("apt-get", "install", "-y", "-qq", "--no-install-recommends", *packages, env=env)


def compose_command() -> list[str]:
    """$COMPOSE if set, else `docker-compose` (compose 1.x, Debian's), else the `docker compose` plug-in; []
    if none is there."""
    if os.environ.get("COMPOSE"):
        return os.environ["COMPOSE"].split()
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    probe = subprocess.run(["docker", "compose", "version"], capture_output=True, check=False)
    return ["docker", "compose"] if shutil.which("docker") and probe.returncode == 0 else []


def daemon_answers() -> bool:
    return subprocess.run(["docker", "info"], capture_output=True, check=False).returncode == 0


@contextlib.contextmanager
def docker_daemon(log_dir: Path) -> Iterator[None]:
    """A Docker daemon that answers: the running one, or `dockerd --bridge=none` started (and stopped) here."""
    if daemon_answers():
        say("using the running Docker daemon")
        yield
        return
    if os.geteuid() != 0:
        raise CheckFailed("no Docker daemon answers and only root can start one")
    log = log_dir / "dockerd.log"
    say(f"starting dockerd --bridge=none (log: {log})")
    with log.open("w") as output:
        # No bridge: every container of the stack uses the host's network, all traffic stays on 127.0.0.1.
        daemon = subprocess.Popen(
            ["dockerd", "--bridge=none"], stdout=output, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        deadline = time.monotonic() + 60
        while not daemon_answers():
            if daemon.poll() is not None or time.monotonic() > deadline:
                raise CheckFailed(f"dockerd did not start:\n{log.read_text()[-2000:]}")
            time.sleep(1)
        yield
    finally:
        say("stopping the Docker daemon this test started")
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.wait(timeout=60)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait()


# -- the base image ---------------------------------------------------------------------------------------


def image_exists(tag: str) -> bool:
    return (
        subprocess.run(["docker", "image", "inspect", tag], capture_output=True, check=False).returncode == 0
    )


def debian_mirror() -> str:
    """The Debian archive that apt uses on this machine (one-line or deb822 sources)."""
    sources = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]
    for path in sources:
        if not path.is_file() or path.suffix not in {".list", ".sources", ""}:
            continue
        for line in path.read_text().splitlines():
            words = line.split()
            if path.suffix == ".sources" and words[:1] == ["URIs:"]:
                uris = words[1:]
            elif words[:1] == ["deb"]:
                uris = [word for word in words[1:] if "://" in word][:1]
            else:
                continue
            for uri in uris:
                if not uri.rstrip("/").endswith(("-security", "debian-security")):
                    return uri
    return "http://deb.debian.org/debian"


def ensure_base_image(work: Path) -> None:
    """BASE_IMAGE from Debian bookworm packages (minbase + Python 3.11), unless an image has that tag."""
    if image_exists(BASE_IMAGE):
        say(f"base image {BASE_IMAGE} is there (docker rmi it to rebuild)")
        return
    mirror = debian_mirror()
    root = work / "rootfs"
    say(f"building the base image {BASE_IMAGE}: debootstrap of bookworm from {mirror} (about 90 s)")
    run(
        "debootstrap",
        "--variant=minbase",
        f"--include={BASE_PACKAGES}",
        "bookworm",
        str(root),
        mirror,
        capture=True,
    )
    # The downloaded packages are not part of the system.
    for cached in (root / "var/cache/apt/archives").glob("*.deb"):
        cached.unlink()
    tar = subprocess.Popen(["tar", "-C", str(root), "-c", "."], stdout=subprocess.PIPE)
    imported = subprocess.run(
        ["docker", "import", "--change", 'CMD ["python3"]', "-", BASE_IMAGE],
        stdin=tar.stdout,
        capture_output=True,
        text=True,
        check=False,
    )
    if tar.stdout is not None:
        tar.stdout.close()
    if tar.wait() != 0 or imported.returncode != 0:
        raise CheckFailed(f"docker import failed: {imported.stderr}")
    shutil.rmtree(root)


# -- the stack --------------------------------------------------------------------------------------------


def free_ports(count: int) -> list[int]:
    """`count` distinct ports that nothing listens on at 127.0.0.1 now."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for each in sockets:
            each.bind(("127.0.0.1", 0))
        return [each.getsockname()[1] for each in sockets]
    finally:
        for each in sockets:
            each.close()


class Stack:
    """The compose project of this test: its variables in an env file of its own, and compose calls."""

    def __init__(self, work: Path, first_day: dt.date) -> None:
        self.settings = dict(zip(PORT_VARIABLES, map(str, free_ports(len(PORT_VARIABLES))), strict=True))
        self.settings |= {
            "COMPOSE_PROJECT_NAME": PROJECT,
            "BASE_IMAGE": BASE_IMAGE,
            "POSTGRES_PASSWORD": secrets.token_hex(16),
            "RECSYS_START_DATE": first_day.isoformat(),
        }
        env_file = work / "compose-test.env"
        env_file.write_text("".join(f"{name}={value}\n" for name, value in self.settings.items()))
        # Only the test's values: none of the stack's variables from the caller's shell or .env.
        documented = variables_of(REPOSITORY / ".env.example")
        self.env = {name: value for name, value in os.environ.items() if name not in documented}
        self.env |= self.settings
        self.compose = [
            *compose_command(),
            "--project-directory",
            str(REPOSITORY),
            "--env-file",
            str(env_file),
        ]
        self.compose += ["--file", str(REPOSITORY / "docker-compose.yml")]

    def port(self, variable: str) -> int:
        return int(self.settings[variable])

    def __call__(self, *args: str, capture: bool = False) -> str:
        return run(*self.compose, *args, env=self.env, capture=capture)

    def wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        waiting = set(SERVICES)
        while waiting:
            for service in sorted(waiting):
                state = self.health(service)
                if state == "healthy":
                    say(f"  {service} is healthy")
                    waiting.discard(service)
                elif state in {"unhealthy", "exited", "dead"}:
                    raise CheckFailed(f"service {service} is {state}")
            if waiting and time.monotonic() > deadline:
                raise CheckFailed(f"not healthy after {timeout:.0f} s: {', '.join(sorted(waiting))}")
            time.sleep(3)

    def health(self, service: str) -> str:
        container = self("ps", "-q", service, capture=True).strip()
        if not container:
            return "missing"
        state = run(
            "docker",
            "inspect",
            "--format",
            "{{.State.Status}} {{.State.Health.Status}}",
            container,
            capture=True,
        ).split()
        return state[1] if state[0] == "running" and len(state) > 1 else state[0]

    def print_logs(self) -> None:
        subprocess.run([*self.compose, "logs", "--no-color", "--tail=60"], env=self.env, check=False)

    def down(self) -> None:
        say("removing the stack and its volumes")
        subprocess.run(
            [*self.compose, "--profile", "cli", "down", "--volumes", "--remove-orphans", "--timeout", "30"],
            env=self.env,
            check=False,
        )


def variables_of(env_example: Path) -> set[str]:
    names = set()
    for line in env_example.read_text().splitlines():
        name, equals, _ = line.lstrip("# ").partition("=")
        if equals and name.isidentifier() and name.isupper():
            names.add(name)
    return names


# -- the checks -------------------------------------------------------------------------------------------


def http_json(url: str, body: dict[str, Any] | None = None, timeout: float = 30) -> Any:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.load(response)


def graphql(stack: Stack, query: str, variables: dict[str, Any]) -> Any:
    """The data of a GraphQL query to the webserver (the API its UI uses)."""
    url = f"http://127.0.0.1:{stack.port('DAGSTER_WEBSERVER_PORT')}/graphql"
    answer = http_json(url, {"query": query, "variables": variables})
    if answer.get("errors"):
        raise CheckFailed(f"GraphQL errors: {answer['errors']}")
    return answer["data"]


JOB_ASSETS = """
query JobAssets($job: PipelineSelector!) {
  assetNodes(pipeline: $job) { assetKey { path } }
}
"""
# What the UI sends when one materializes a range of partitions of a set of assets.
LAUNCH_BACKFILL = """
mutation LaunchBackfill($params: LaunchBackfillParams!) {
  launchPartitionBackfill(backfillParams: $params) {
    __typename
    ... on LaunchBackfillSuccess { backfillId }
    ... on Error { message }
  }
}
"""
BACKFILL_STATUS = """
query Backfill($id: String!) {
  partitionBackfillOrError(backfillId: $id) {
    __typename
    ... on PartitionBackfill { status runs(limit: 20) { runId status } error { message } }
    ... on Error { message }
  }
}
"""


def launch_backfill(stack: Stack, first_day: dt.date, last_day: dt.date) -> str:
    """A backfill of every asset of the daily job over [first_day, last_day], as the UI launches it."""
    job = {
        "pipelineName": "daily_pipeline",
        "repositoryName": "__repository__",
        "repositoryLocationName": "recsys",
    }
    nodes = graphql(stack, JOB_ASSETS, {"job": job})["assetNodes"]
    days = [(first_day + dt.timedelta(days=n)).isoformat() for n in range((last_day - first_day).days + 1)]
    params = {
        "partitionNames": days,
        "assetSelection": [{"path": node["assetKey"]["path"]} for node in nodes],
        "fromFailure": False,
        "tags": [{"key": "recsys/launched_by", "value": "compose-test"}],
    }
    launched = graphql(stack, LAUNCH_BACKFILL, {"params": params})["launchPartitionBackfill"]
    if launched["__typename"] != "LaunchBackfillSuccess":
        raise CheckFailed(f"launchPartitionBackfill: {launched}")
    say(f"backfill {launched['backfillId']} of {len(nodes)} assets x {len(days)} days launched")
    return str(launched["backfillId"])


def wait_for_backfill(stack: Stack, backfill_id: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    last = None
    while True:
        found = graphql(stack, BACKFILL_STATUS, {"id": backfill_id})["partitionBackfillOrError"]
        if found["__typename"] != "PartitionBackfill":
            raise CheckFailed(f"backfill {backfill_id}: {found}")
        runs = ", ".join(f"{run['runId'][:8]} {run['status']}" for run in found["runs"]) or "no run yet"
        progress = f"backfill {found['status']}; runs: {runs}"
        if progress != last:
            say(f"  {progress}")
            last = progress
        if found["status"] in BACKFILL_DONE:
            failed = [run for run in found["runs"] if run["status"] != "SUCCESS"]
            if found["status"] not in BACKFILL_SUCCEEDED or failed:
                raise CheckFailed(f"backfill ended {found['status']}: {found}")
            return
        if time.monotonic() > deadline:
            raise CheckFailed(f"backfill not finished after {timeout:.0f} s: {progress}")
        time.sleep(5)


def check_replicas_serve(stack: Stack, last_day: dt.date, timeout: float) -> None:
    """Both API replicas serve one manifest as of `last_day`, and a recommendation from it."""
    versions = set()
    for variable in ("API_1_PORT", "API_2_PORT"):
        base = f"http://127.0.0.1:{stack.port(variable)}"
        manifest = served_manifest(base, last_day, timeout)
        recommended = http_json(f"{base}/v1/recommendations?{TARGET}&user_id={USER}&k=5")
        if not recommended["items"] or recommended["manifest_version"] != manifest["manifest_version"]:
            raise CheckFailed(f"{base}: unexpected recommendations {recommended}")
        versions.add(manifest["manifest_version"])
        say(
            f"  {base}: manifest {manifest['manifest_version'][:12]} as of {manifest['as_of']}, "
            f"{manifest['items']} items; recommendations for {USER}: "
            + ", ".join(item["item_id"] for item in recommended["items"])
        )
    if len(versions) != 1:
        raise CheckFailed(f"the replicas serve different manifests: {sorted(versions)}")


def served_manifest(base: str, last_day: dt.date, timeout: float) -> Any:
    """The manifest the API at `base` serves, once it is the one as of `last_day` (a replica loads a newly
    published manifest within its poll interval)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            manifest = http_json(f"{base}/v1/manifest?{TARGET}")
        except urllib.error.HTTPError as error:
            if error.code != 404:  # 404: no manifest loaded yet
                raise
            manifest = None
        if manifest is not None and manifest["as_of"] == last_day.isoformat():
            return manifest
        if time.monotonic() > deadline:
            served = "no manifest" if manifest is None else f"a manifest as of {manifest['as_of']}"
            raise CheckFailed(f"{base} serves {served}, not one as of {last_day}")
        time.sleep(1)


# -- the test ---------------------------------------------------------------------------------------------


def engine_check() -> int:
    try:
        install_missing_tools()
        with (
            tempfile.TemporaryDirectory(prefix="recsys-compose-test-") as scratch,
            docker_daemon(Path(scratch)),
        ):
            say("a Docker daemon answers")
    except CheckFailed as failure:
        say(f"no Docker daemon here: {failure}")
        return 1
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--timeout", type=float, default=900, help="seconds for the backfill (default 900)")
    parser.add_argument(
        "--engine-check",
        action="store_true",
        help="only check that a Docker daemon answers or can be started here (installing it if missing)",
    )
    args = parser.parse_args()
    if args.engine_check:
        return engine_check()
    last_day = dt.datetime.now(dt.UTC).date() - dt.timedelta(days=1)
    first_day = last_day - dt.timedelta(days=DAYS - 1)
    try:
        install_missing_tools()
        with tempfile.TemporaryDirectory(prefix="recsys-compose-test-") as scratch:
            work = Path(scratch)
            with docker_daemon(work):
                ensure_base_image(work)
                stack = Stack(work, first_day)
                say(f"building the images on {BASE_IMAGE}")
                stack("build")
                try:
                    ports = ", ".join(f"{name}={stack.settings[name]}" for name in PORT_VARIABLES)
                    say(f"starting the stack (project {PROJECT}; {ports})")
                    stack("up", "--detach")
                    stack.wait_healthy(timeout=300)
                    say(
                        f"generating {DAYS} days of events, {first_day} to {last_day}, into the shared volume"
                    )
                    stack("run", "--rm", "recsys", "generate", "--end", last_day.isoformat(), *GENERATE)
                    backfill_id = launch_backfill(stack, first_day, last_day)
                    wait_for_backfill(stack, backfill_id, timeout=args.timeout)
                    say("checking that both API replicas serve the published manifest")
                    check_replicas_serve(stack, last_day, timeout=60)
                except BaseException:
                    stack.print_logs()
                    raise
                finally:
                    stack.down()
    except (CheckFailed, urllib.error.URLError) as failure:
        say(f"FAILED: {failure}")
        return 1
    say("passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
