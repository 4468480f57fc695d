"""The ``local`` backend: each job is a Ray job (Ray's job submission API, one driver per job) on a
local Ray cluster, running ``sdray train`` (or ``sdray tune``) on the document.

The cluster is either joined (``--ray-address http://HOST:8265``, the dashboard) or started once by the
service as its own process group, recorded under the data dir, and found again after a service restart:
jobs outlive the service. No field of the document reaches a shell: the entrypoint is fixed, and the
document travels in the job's environment as JSON (``sdray.service.runner`` reads it). Storage
credentials are not passed: the cluster's processes have them from the environment they were started in.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import socket
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

from sdray.processes import is_running, started_at, stop_process_group
from sdray.service.backends.base import Backend, BackendError, BackendStatus, tail_lines
from sdray.states import JobState

_STATES = {"PENDING": JobState.PENDING, "RUNNING": JobState.RUNNING, "SUCCEEDED": JobState.SUCCEEDED,
           "FAILED": JobState.FAILED, "STOPPED": JobState.CANCELLED}
PREEMPTED_EXIT = 3  # `sdray train`'s and the runner's status for a run stopped at a checkpoint on SIGTERM


def job_state(info) -> JobState:
    """The service's state of a Ray job (``JobInfo``): a driver that ended with the preempted status stopped
    at a checkpoint, it did not fail."""
    state = _STATES.get(str(info.status.value), JobState.PENDING)
    return JobState.PREEMPTED if state == JobState.FAILED and info.driver_exit_code == PREEMPTED_EXIT else state


# Set for every job driver: no usage reporting, quiet Ray Train. The Hub is reached only for hf:// sources (the
# service's own HF_HUB_OFFLINE, where set, reaches the drivers through the Ray head's environment).
JOB_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_DISABLE_TELEMETRY": "1", "TOKENIZERS_PARALLELISM": "false",
           "RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS": "0", "PYTHONUNBUFFERED": "1",
           # `sdray train` passes its own runtime env to ray.init; inside a Ray job the two are merged.
           "RAY_OVERRIDE_JOB_RUNTIME_ENV": "1"}


# Ray 2.60 heads require a token (kept in ~/.ray/auth_token); a client process must be told to send it.
AUTH_ENV = {"RAY_AUTH_MODE": "token"}
_NOT_FOUND = re.compile(r"status code 404\b")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_head(data_dir: Path, num_cpus: int | None = None) -> dict:
    """Start a Ray head on 127.0.0.1 in its own session (it outlives the service) and record it in
    ``<data_dir>/ray-cluster.json``; returns the record (pid, gcs address, dashboard URL)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    gcs, dash = _free_port(), _free_port()
    ray = Path(sys.executable).with_name("ray")
    cmd = [str(ray) if ray.exists() else "ray", "start", "--head", "--block", "--node-ip-address=127.0.0.1",
           f"--port={gcs}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--include-dashboard=true",
           "--disable-usage-stats"]
    if num_cpus is not None:
        cmd.append(f"--num-cpus={num_cpus}")
    log = open(data_dir / "ray-head.log", "ab")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, **JOB_ENV, **AUTH_ENV})
    record = {"pid": proc.pid, "started": started_at(proc.pid), "gcs_address": f"127.0.0.1:{gcs}",
              "dashboard_url": f"http://127.0.0.1:{dash}"}
    (data_dir / "ray-cluster.json").write_text(json.dumps(record))
    return record


def stop_head(record: dict, timeout: float = 5.0) -> None:
    """Stop a head that ``start_head`` started: its whole process group (SIGTERM, then SIGKILL)."""
    stop_process_group(record["pid"], grace_s=timeout, started=record.get("started"))
    # `ray start` told every later ray.init() on this machine to join it; it is gone now.
    current = Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"
    port = record["gcs_address"].rsplit(":", 1)[-1]
    if current.exists() and current.read_text().strip().endswith(f":{port}"):
        current.unlink(missing_ok=True)


class LocalRayBackend(Backend):
    name = "local"

    def __init__(self, address: str | None, data_dir: Path, num_cpus: int | None = None,
                 python: str = sys.executable):
        for key, value in AUTH_ENV.items():  # before Ray is imported: it reads the mode once
            os.environ.setdefault(key, value)
        self.python = python
        self.head: dict | None = None
        if address is None:
            record = Path(data_dir) / "ray-cluster.json"
            self.head = json.loads(record.read_text()) if record.exists() else None
            if self.head is None or not is_running(self.head["pid"], self.head.get("started")):
                self.head = start_head(Path(data_dir), num_cpus)
            address = self.head["dashboard_url"]
        self.address = address if "://" in address else f"http://{address}"
        self._client = None

    @property
    def client(self):
        """The job submission client, made on first use (the dashboard of a new head takes seconds)."""
        if self._client is None:
            from ray.job_submission import JobSubmissionClient

            try:
                self._client = JobSubmissionClient(self.address)
            except (ConnectionError, RuntimeError, ValueError) as exc:
                raise BackendError(f"the Ray dashboard at {self.address} does not answer: {exc}") from None
        return self._client

    def ready(self) -> tuple[bool, str]:
        try:
            self.client.get_version()
        except BackendError as exc:
            return False, str(exc)
        except Exception as exc:  # requests' connection errors and Ray's own
            return False, f"the Ray dashboard at {self.address} does not answer: {exc}"
        try:  # the dashboard answers seconds before the head's node has registered: no job could start yet
            capacity = self.capacity()
        except BackendError as exc:
            return False, str(exc)
        return True, f"Ray cluster at {self.address} ({capacity['CPU']:g} CPU, {capacity['GPU']:g} GPU)"

    def capacity(self) -> dict[str, float]:
        """The CPUs and GPUs of the cluster's live nodes. Raises BackendError (capacity unknown: jobs wait)
        while it lists no node, or a node whose resources have not registered yet."""
        from ray.util.state import list_nodes

        try:
            nodes = list_nodes(address=self.address, filters=[("state", "=", "ALIVE")], detail=True, timeout=10)
        except Exception as exc:  # the state API raises its own and requests' errors
            raise BackendError(f"cannot list the Ray cluster's nodes at {self.address}: {exc}") from None
        if not nodes or any(not (node.resources_total or {}).get("CPU") for node in nodes):
            raise BackendError(f"the Ray cluster at {self.address} has not registered its nodes yet "
                               f"({len(nodes)} listed, not all with their CPUs); jobs wait for it")
        total = {"CPU": 0.0, "GPU": 0.0}
        for node in nodes:
            for key in total:
                total[key] += float((node.resources_total or {}).get(key, 0))
        return total

    def find(self, job_id: str, *, namespace: str | None = None) -> str | None:
        handle = self._handle(job_id)
        return None if self.status(handle).state == "missing" else handle

    def submit(self, job_id: str, tenant: str, document: dict, env: dict[str, str], *,
               namespace: str | None = None) -> str:
        handle = self._handle(job_id)
        runtime_env = {"env_vars": {**JOB_ENV, **env, "SDRAY_JOB_DOCUMENT": json.dumps(document)}}
        if os.environ.get("SDRAY_CACHE_DIR"):
            runtime_env["env_vars"]["SDRAY_CACHE_DIR"] = os.environ["SDRAY_CACHE_DIR"]
        try:
            return self.client.submit_job(
                entrypoint=f"{shlex.quote(self.python)} -m sdray.service.runner",  # fixed: nothing of the document
                submission_id=handle, runtime_env=runtime_env, entrypoint_num_cpus=0,
                metadata={"sdray_job_id": job_id, "tenant": tenant},
            )
        except BackendError:
            raise
        except Exception as exc:
            raise BackendError(f"Ray refused job {job_id}: {exc}") from None

    @staticmethod
    def _handle(job_id: str) -> str:
        """The Ray job's submission id: one per service job, so Ray refuses to run a job twice."""
        return f"sdray-{job_id}"

    def status(self, handle: str) -> BackendStatus:
        try:
            info = self.client.get_job_info(handle)
        except BackendError:
            raise
        except Exception as exc:
            # Ray's SDK raises RuntimeError("Request failed with status code 404: Job … does not exist.") for
            # an unknown job and has no typed error for it. Match both parts: a bare "404" could be part of a
            # port in a connection error, and only a dashboard that says so may mark a job lost.
            if _NOT_FOUND.search(str(exc)) and "does not exist" in str(exc):
                return BackendStatus("missing", str(exc).strip().splitlines()[-1])
            raise BackendError(f"Ray job {handle}: {exc}") from None
        # Ray's message of a failed job ends with the driver's last log lines (up to 20,000 characters).
        message = (info.message or "").strip()
        if len(message) > 2000:
            message = "…" + message[-2000:]
        return BackendStatus(job_state(info), message)

    def cancel(self, handle: str) -> None:
        try:
            self.client.stop_job(handle)
        except BackendError:
            raise
        except Exception as exc:
            raise BackendError(f"cannot stop Ray job {handle}: {exc}") from None

    async def follow_logs(self, handle: str, offset: int) -> AsyncIterator[str]:
        """Ray's log stream of the job (a websocket to the dashboard that sends the log from its start and
        closes once the job has ended), less its first ``offset`` characters."""
        skip = offset
        try:
            async for chunk in self.client.tail_job_logs(handle):
                if skip >= len(chunk):
                    skip -= len(chunk)
                    continue
                chunk, skip = chunk[skip:], 0
                yield chunk
        except BackendError:
            raise
        except Exception as exc:  # aiohttp's and Ray's errors
            raise BackendError(f"cannot follow the logs of Ray job {handle}: {exc}") from None

    def logs(self, handle: str, tail: int | None = None) -> str:
        try:
            text = self.client.get_job_logs(handle)
        except BackendError:
            raise
        except Exception as exc:
            raise BackendError(f"cannot read the logs of Ray job {handle}: {exc}") from None
        return tail_lines(text, tail)
