"""Make docs/dashboard.png: the Grafana dashboard's own queries (helm/sdray/files/dashboard.json) run against a
real Prometheus that scraped a real sdray service while real training runs reported to it, plotted in the
dashboard's layout with matplotlib (no Grafana server installs from the registries this was made with).

    python docs/dashboard.py [--out docs/dashboard.png] [--jobs 3] [--steps 60]

Needs Debian's prometheus (`apt-get install -y --no-install-recommends prometheus`). The picture in the
README took 14 minutes on a 2-core machine shared with other test runs (load average 20 to 40); the three
60-step runs themselves are short, their Ray start and data loading are most of it.

What runs, all on 127.0.0.1:
- the service's app (``create_app``, what ``sdray serve --backend dry-run`` runs) under uvicorn, its dry-run
  backend pretending a cluster of 3 CPUs: a 1-worker job takes 2 (its worker and its driver), so one job runs
  at a time and the others queue (the queue-wait panel);
- for each job the backend starts, a real training run: ``sdray train --in-process`` as its own process on
  the scikit-learn digits (tiny preset), given the environment the backend was handed for the job's driver
  (``SDRAY_PROGRESS_URL``, ``SDRAY_PROGRESS_TOKEN``), so it posts its progress as a service job's driver does;
  when it exits the backend reports the job ended, and the next one starts;
- a client sending traffic the whole time: job lists and reads, a document the tenant policy refuses and one
  that fails validation now and then;
- Prometheus scraping ``/metrics`` every second. At the end each panel's queries go through its HTTP API
  (``/api/v1/query_range``) with ``$tenant`` set to All and ``$__rate_interval`` to 15 s.

No GPU and no controller take part: the GPU-memory and controller panels say "No data", as Grafana would.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import uvicorn
import yaml

from sdray.data.digits import import_digits
from sdray.processes import stop_process
from sdray.service.app import Settings, create_app
from sdray.service.auth import create_token
from sdray.service.backends.dryrun import DryRunBackend

REPO = Path(__file__).resolve().parent.parent
DASHBOARD = REPO / "helm" / "sdray" / "files" / "dashboard.json"
RATE_INTERVAL = "15s"
SCALES = {"percentunit": (100.0, "%"), "bytes": (1 / 2**20, "MiB"), "s": (1.0, "s"), "reqps": (1.0, "req/s")}


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def poll(condition, timeout: float, what: str, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(interval)  # polling interval, bounded by the deadline
    return value


def start_prometheus(work: Path, target: str) -> tuple[subprocess.Popen, str]:
    binary = shutil.which("prometheus")
    if binary is None:
        sys.exit("prometheus is not installed: apt-get install -y --no-install-recommends prometheus")
    config = {"global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
              "scrape_configs": [{"job_name": "sdray", "static_configs": [{"targets": [target]}]}]}
    (work / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    proc = subprocess.Popen([binary, f"--config.file={work / 'prometheus.yml'}", f"--storage.tsdb.path={work / 'tsdb'}",
                             f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
                            stdout=subprocess.DEVNULL, stderr=open(work / "prometheus.log", "wb"),
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        try:
            return httpx.get(f"{url}/-/ready", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    poll(ready, 30, "prometheus")
    return proc, url


def job_document(name: str, work: Path, steps: int) -> dict:
    return {
        "apiVersion": "sdray.io/v1alpha1", "kind": "DiffusionJob", "metadata": {"name": name},
        "spec": {
            "model": {"preset": "tiny"},
            "data": {"uri": str(work / "digits"), "validation_fraction": 0.1},
            "train": {"max_steps": steps, "batch_size": 16, "learning_rate": 1e-3, "log_every_n_steps": 5},
            "distributed": {"num_workers": 1},
            "checkpoint": {"uri": str(work / "checkpoints"), "every_n_steps": 15, "keep_last": 2},
            "output": {"uri": str(work / "out" / name)},
        },
    }


class Traffic(threading.Thread):
    """Reads the tenants' jobs every 0.3 s; every 5 s one document the policy refuses and one invalid one."""

    def __init__(self, url: str, tokens: dict[str, str], work: Path):
        super().__init__(daemon=True)
        self.clients = [httpx.Client(base_url=url, headers={"Authorization": f"Bearer {t}"}, timeout=30)
                        for t in tokens.values()]
        self.work, self.stop = work, threading.Event()

    def run(self) -> None:
        refused = job_document("refused", self.work, 10)
        refused["spec"]["cluster"] = {"image": "someone/else"}
        invalid = job_document("invalid", self.work, 10)
        invalid["spec"]["train"]["learning_rate"] = -1
        for i in range(5000):  # at most ~25 minutes of it
            if self.stop.wait(0.3):
                return
            client = self.clients[i % len(self.clients)]
            for job in client.get("/v1/jobs").json()["jobs"]:
                client.get(f"/v1/jobs/{job['id']}")
            if i % 17 == 0:
                client.post("/v1/jobs", json=refused)
                client.post("/v1/validate", json=invalid)


def run_jobs(url: str, backend: DryRunBackend, tokens: dict[str, str], work: Path, count: int, steps: int,
             deadline_s: float) -> None:
    """Submit ``count`` jobs (tenants in turn), train each one the backend starts, end it when its run exits."""
    tenants = list(tokens)
    admin = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {tokens['ops']}"}, timeout=30)
    for i in range(count):
        tenant = tenants[i % (len(tenants) - 1)]  # not ops
        client = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {tokens[tenant]}"}, timeout=30)
        r = client.post("/v1/jobs", json=job_document(f"digits-{tenant}-{i + 1}", work, steps))
        r.raise_for_status()
        print(f"submitted {r.json()['name']} as {tenant}", flush=True)
        time.sleep(3)  # spread the submissions a little, for the queue panels (pacing, not synchronisation)
    runs: dict[str, subprocess.Popen] = {}
    tries: dict[str, int] = {}

    def train(job: dict) -> None:
        handle = job["backend_handle"]
        doc = work / f"{job['name']}.yaml"
        doc.write_text(yaml.safe_dump(job_document(job["name"], work, steps)))
        env = {**os.environ, **backend.env[handle], "HF_HUB_OFFLINE": "1"}
        tries[handle] = tries.get(handle, 0) + 1
        runs[handle] = subprocess.Popen([sys.executable, "-m", "sdray.cli", "train", str(doc), "--in-process"],
                                        env=env, stdout=open(work / f"{job['name']}.log", "wb"),
                                        stderr=subprocess.STDOUT, start_new_session=True)
        print(f"training {job['name']}", flush=True)

    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        jobs = admin.get("/v1/jobs").json()["jobs"]
        if all(j["state"] in ("Succeeded", "Failed", "Cancelled") for j in jobs):
            return
        for job in jobs:
            handle = job.get("backend_handle")
            if job["state"] == "Running" and handle not in runs:
                train(job)
            elif handle in runs and job["state"] == "Running" and runs[handle].poll() is not None:
                code = runs[handle].returncode
                log = (work / f"{job['name']}.log").read_text(errors="replace")
                if code != 0 and "timed out during startup" in log and tries[handle] < 3:
                    # Ray's node did not start in time (a loaded machine): a driver's retry, as a RayJob's
                    # backoffLimit would make one; the run resumes from its own checkpoints if it has any
                    print(f"{job['name']}: Ray did not start in time; again", flush=True)
                    train(job)
                    continue
                backend.finish(handle, "succeeded" if code == 0 else "failed")
                print(f"{job['name']} ended ({code})", flush=True)
        time.sleep(1)  # polling interval
    for proc in runs.values():
        stop_process(proc, grace_s=10)
    raise TimeoutError(f"the jobs did not end within {deadline_s:.0f} s")


def query_panels(prom: str, start: float, end: float) -> list[tuple[dict, list[tuple[str, list, list]]]]:
    """Each panel of the dashboard with its series: (legend, times, values)."""
    dash = json.loads(DASHBOARD.read_text())
    variables = {f"${v['name']}": v.get("allValue", ".*") for v in dash["templating"]["list"]}
    out = []
    for panel in dash["panels"]:
        series = []
        for target in panel.get("targets", []):
            expr = target["expr"].replace("$__rate_interval", RATE_INTERVAL)
            for name, value in variables.items():
                expr = expr.replace(name, value)
            r = httpx.get(f"{prom}/api/v1/query_range", params={"query": expr, "start": start, "end": end, "step": 2})
            body = r.json()
            if body.get("status") != "success":
                raise RuntimeError(f"{panel['title']}: {expr}: {body.get('error')}")
            for result in body["data"]["result"]:
                legend = re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: result["metric"].get(m.group(1), ""),
                                target.get("legendFormat") or expr)
                times = [float(t) - start for t, _ in result["values"]]
                values = [float(v) for _, v in result["values"]]
                series.append((legend, times, values))
        out.append((panel, series))
    return out


def plot(panels: list[tuple[dict, list]], out: Path, subtitle: str, minutes: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.style.use("dark_background")
    height = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p, _ in panels)
    fig = plt.figure(figsize=(20, height * 0.42))
    grid = fig.add_gridspec(height, 24, hspace=2.4, wspace=1.2, left=0.04, right=0.99, top=0.95, bottom=0.02)
    fig.suptitle(f"sdray dashboard: {subtitle}", fontsize=15, x=0.04, ha="left")
    for panel, series in panels:
        pos = panel["gridPos"]
        if panel["type"] == "row":
            ax = fig.add_subplot(grid[pos["y"], :])
            ax.axis("off")
            ax.text(0, -1.2, panel["title"], fontsize=13, weight="bold", va="bottom")
            continue
        ax = fig.add_subplot(grid[pos["y"] + 1:pos["y"] + pos["h"], pos["x"]:pos["x"] + pos["w"]])
        unit = panel["fieldConfig"]["defaults"].get("unit", "none")
        scale, label = SCALES.get(unit, (1.0, ""))
        ax.set_title(panel["title"], fontsize=10, loc="left")
        ax.set_xlim(0, minutes)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.2)
        if not series:
            ax.text(0.5, 0.5, "No data", ha="center", va="center", transform=ax.transAxes, fontsize=11, alpha=0.6)
            ax.set_xticks([])
            ax.set_yticks([])
            continue
        for legend, times, values in series:
            ax.plot([t / 60 for t in times], [v * scale for v in values], linewidth=1.2, label=legend)
        if label:
            ax.set_ylabel(label, fontsize=7)
        ax.set_xlabel("minutes", fontsize=7)
        ax.legend(fontsize=6, loc="upper left", ncol=2 if len(series) > 4 else 1, framealpha=0.3)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80)
    print(f"wrote {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "dashboard.png")
    parser.add_argument("--jobs", type=int, default=3)
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    work = Path(tempfile.mkdtemp(prefix="sdray-dashboard-"))
    import_digits(str(work / "digits"), "imagefolder", 16, limit=400)
    tokens_file = work / "tokens.json"
    tokens = {name: create_token(tokens_file, name) for name in ("alice", "bob")}
    tokens["ops"] = create_token(tokens_file, "ops", role="admin")
    policy = work / "policy.yaml"
    policy.write_text(yaml.safe_dump({"default": {"local_paths": [str(work)]}}))

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    backend = DryRunBackend(hold=True, capacity={"CPU": 3, "GPU": 0})
    app = create_app(Settings(tokens=tokens_file, db=work / "jobs.db", public_url=url, poll_interval_s=0.5,
                              policy=policy), backend)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    poll(lambda: server.started, 30, "the service")
    prom, prom_url = start_prometheus(work, f"127.0.0.1:{port}")
    traffic = Traffic(url, {k: v for k, v in tokens.items() if k != "ops"}, work)
    start = time.time()
    try:
        traffic.start()
        run_jobs(url, backend, tokens, work, args.jobs, args.steps, deadline_s=900)
        time.sleep(10)  # ten more scrapes after the last job ended (pacing the picture's right edge)
        end = time.time()
        panels = query_panels(prom_url, start, end)
        plot(panels, args.out, f"{args.jobs} tiny digits runs on a shared 2-core CPU, "
                               f"scraped by Prometheus every second", (end - start) / 60)
    finally:
        traffic.stop.set()
        stop_process(prom, grace_s=10)
        server.should_exit = True
        thread.join(timeout=30)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
