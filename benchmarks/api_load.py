"""Load on the REST service: 200 concurrent clients posting job documents to /v1/validate and /v1/jobs.

    .venv/bin/python benchmarks/api_load.py [--clients 200] [--seconds 20] [--think-ms 0]
                                            [--warmup-s 2] [--max-requests 100000] [--poll-interval S]

Starts ``sdray serve --backend dry-run`` as its own process on 127.0.0.1 (a free port, a fresh tokens
file and SQLite store in a temporary directory), so the server and this load generator do not share a
GIL; the dry-run backend accepts every job and runs nothing, so only the service's own work is measured.
``sdray serve`` runs uvicorn with one worker: the server uses at most one core, the load generator the
other.

Then ``--clients`` asyncio tasks, each its own ``httpx.AsyncClient`` (one keep-alive connection, opened
before the clock starts), loop over a fixed mix for ``--warmup-s`` (not measured) and ``--seconds``
(measured; at most ``--max-requests``):

    POST /v1/validate  valid JSON document           → expect 200
    POST /v1/validate  valid YAML document           → expect 200
    POST /v1/validate  invalid JSON document         → expect 422 (bad value, unknown field)
    POST /v1/validate  invalid YAML document         → expect 422 (missing section, wrong type)
    POST /v1/jobs      valid JSON document           → expect 201
    POST /v1/jobs      valid YAML document           → expect 201
    POST /v1/jobs      invalid JSON document         → expect 422 (name not a DNS label)

"Errors" are any other status and any transport error or timeout. ``--think-ms`` pauses each client
between its requests (uniformly 0.5-1.5 times it; first requests spread over one pause). With 0 (the
default) it is a closed loop: every client always has a request in flight, so this measures the
service's saturation throughput, and latency is mostly queueing (Little's law: mean latency ≈ clients /
throughput, whatever the service does). With a think time the offered load is about clients / think
time requests/s, and the latency is what a client sees at that load.

Prints client-side latency (p50/p90/p99/max) per request kind, per endpoint and overall, requests/s,
errors, the CPU each process used, then the server's own view from its ``/metrics`` (read at the start
and end of the measured window): the ``sdray_http_request_duration_seconds`` histogram, measured inside
the service from the metrics middleware's start to the response's start (without the time a request
waits in the socket and in the event loop before the service starts on it, which the client-side figure
includes). Ends with PASS/FAIL against the goal: client-side p99 ≤ 50 ms and 0 errors (exit status 0/1).

The job store grows with every accepted POST /v1/jobs (quota unlimited: the default); the dry-run
backend marks each job succeeded at the service's next look (``--poll-interval``).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import random
import re
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil
import yaml

from sdray.processes import stop_process
from sdray.service.auth import create_token

GOAL_P99_S = 0.050
TENANTS = ("acme", "globex", "initech", "umbrella")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def document(i: int) -> dict:
    """A valid DiffusionJob like the ones people submit (a few hundred bytes of JSON)."""
    return {
        "apiVersion": "sdray.io/v1alpha1", "kind": "DiffusionJob",
        "metadata": {"name": f"load-{i}", "labels": {"team": f"t{i % 7}", "bench": "api-load"}},
        "spec": {
            "model": {"preset": "tiny"},
            "data": {"uri": "s3://datasets/digits", "validation_fraction": 0.1},
            "train": {"max_steps": 1000, "batch_size": 32, "learning_rate": 1e-3, "log_every_n_steps": 10},
            "distributed": {"num_workers": 2, "resources_per_worker": {"CPU": 1}},
            "checkpoint": {"every_n_steps": 100, "keep_last": 2},
            "output": {"uri": f"s3://runs/load-{i}"},
        },
    }


def invalid_documents() -> list[dict]:
    bad_value = document(0)
    bad_value["spec"]["train"]["learning_rate"] = -1
    bad_value["spec"]["train"]["bogus"] = 3
    no_output = document(1)
    del no_output["spec"]["output"]
    no_output["spec"]["distributed"]["num_workers"] = "two"
    bad_name = document(2)
    bad_name["metadata"]["name"] = "Not A DNS Label!"
    return [bad_value, no_output, bad_name]


def requests_mix() -> list[tuple[str, str, str, bytes, int]]:
    """(label, path, content type, body, expected status); a client cycles through these."""
    good_json = json.dumps(document(3)).encode()
    good_yaml = yaml.safe_dump(document(4)).encode()
    bad = invalid_documents()
    j, y = "application/json", "application/yaml"
    return [
        ("validate valid json", "/v1/validate", j, good_json, 200),
        ("validate valid yaml", "/v1/validate", y, good_yaml, 200),
        ("validate invalid json", "/v1/validate", j, json.dumps(bad[0]).encode(), 422),
        ("validate invalid yaml", "/v1/validate", y, yaml.safe_dump(bad[1]).encode(), 422),
        ("jobs valid json", "/v1/jobs", j, good_json, 201),
        ("jobs valid yaml", "/v1/jobs", y, good_yaml, 201),
        ("jobs invalid json", "/v1/jobs", j, json.dumps(bad[2]).encode(), 422),
    ]


class Server:
    """``sdray serve --backend dry-run`` as its own process (stopped with SIGTERM, by PID)."""

    def __init__(self, root: Path, tokens: Path, port: int, *extra: str):
        self.url = f"http://127.0.0.1:{port}"
        self.log = root / "serve.log"
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "sdray.cli", "serve", "--backend", "dry-run", "--port", str(port),
             "--tokens", str(tokens), "--db", str(root / "jobs.db"), *extra],
            stdout=subprocess.DEVNULL, stderr=open(self.log, "wb"), env=env, start_new_session=True)
        deadline = time.monotonic() + 60
        while True:
            if self.proc.poll() is not None:
                raise SystemExit(f"sdray serve exited ({self.proc.returncode}): {self.log.read_text()[-2000:]}")
            try:
                if httpx.get(self.url + "/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise SystemExit(f"sdray serve did not answer within 60 s: {self.log.read_text()[-2000:]}")
            time.sleep(0.2)
        self.ps = psutil.Process(self.proc.pid)

    def cpu_s(self) -> float:
        t = self.ps.cpu_times()
        return t.user + t.system

    def stop(self) -> None:
        stop_process(self.proc, grace_s=30)


class Load:
    """What the clients saw: latencies by request kind, unexpected answers, and the measured window."""

    def __init__(self, labels: list[str]):
        self.latencies: dict[str, list[float]] = {label: [] for label in labels}
        self.errors: list[str] = []
        self.sent = 0          # measured requests (started inside the window)
        self.wall = 0.0        # the window's length
        self.cpu_server = self.cpu_client = 0.0
        self.before: dict = {}  # the server's histogram at the window's start


async def run_load(url: str, tokens: list[str], server: Server, clients: int, warmup_s: float, seconds: float,
                   max_requests: int, think_s: float) -> Load:
    """All clients connect first (untimed), then load for ``warmup_s`` (not measured) + ``seconds``. Only
    requests started inside the measured window count, on both sides: the server's histogram is read at
    the window's start and end."""
    mix = requests_mix()
    load = Load([label for label, *_ in mix])
    me = psutil.Process()
    # One AsyncClient (one keep-alive connection) per simulated client, as 200 separate clients would have:
    # httpx's pool costs CPU in proportion to its connections (one shared pool of 200 costs ~11 ms of CPU
    # per request here), which would make this load generator, not the service, the bottleneck. One TLS
    # context for all (plain HTTP here, but httpx builds one per client otherwise, ~10 ms each).
    tls = ssl.create_default_context()
    connected = 0
    all_connected, go = asyncio.Event(), asyncio.Event()
    window = {"from": float("inf"), "to": float("inf")}

    async def one_client(n: int) -> None:
        nonlocal connected
        headers = {"Authorization": f"Bearer {tokens[n % len(tokens)]}"}
        i = n  # clients start at different places in the mix
        async with httpx.AsyncClient(base_url=url, verify=tls, timeout=httpx.Timeout(30.0),
                                     limits=httpx.Limits(max_connections=1, max_keepalive_connections=1)) as client:
            (await client.get("/healthz")).raise_for_status()  # the connection is up before the clock starts
            connected += 1
            if connected == clients:
                all_connected.set()
            await go.wait()
            if think_s:  # arrivals spread over one think time, not all at once
                await asyncio.sleep(random.uniform(0, 2 * think_s))
            while time.perf_counter() < window["to"] and load.sent < max_requests:
                label, path, ctype, body, expect = mix[i % len(mix)]
                i += 1
                start = time.perf_counter()
                measured = window["from"] <= start < window["to"]
                load.sent += measured
                try:
                    r = await client.post(path, content=body, headers={**headers, "Content-Type": ctype})
                    status = r.status_code
                except httpx.HTTPError as exc:
                    status = None
                    if measured:
                        load.errors.append(f"{label}: {type(exc).__name__}: {exc}")
                elapsed = time.perf_counter() - start
                if measured:
                    if status is not None and status != expect:
                        load.errors.append(f"{label}: HTTP {status} (expected {expect}): {r.text[:200]}")
                    load.latencies[label].append(elapsed)
                if think_s:
                    await asyncio.sleep(random.uniform(0.5, 1.5) * think_s)

    async def clock() -> None:
        await all_connected.wait()
        # The load generator's own full garbage collections (generation 2: 30-100 ms each here, every few
        # seconds) would show up as latency of the service. None during the run: what the requests leave
        # behind is still collected by the young generations, and the rest after the run.
        gc.collect()
        gc.freeze()
        gc.set_threshold(*gc.get_threshold()[:2], 1_000_000)
        now = time.perf_counter()
        window["from"], window["to"] = now + warmup_s, now + warmup_s + seconds
        go.set()
        await asyncio.sleep(warmup_s)
        async with httpx.AsyncClient(base_url=url, verify=tls, timeout=30) as scraper:
            load.before = server_histogram((await scraper.get("/metrics")).text)
        load.cpu_server, load.cpu_client = server.cpu_s(), sum(me.cpu_times()[:2])

    thresholds = gc.get_threshold()
    try:
        await asyncio.gather(clock(), *(one_client(n) for n in range(clients)))
    finally:
        gc.set_threshold(*thresholds)
        gc.unfreeze()
    load.wall = min(time.perf_counter(), window["to"]) - window["from"]
    load.cpu_server = server.cpu_s() - load.cpu_server
    load.cpu_client = sum(me.cpu_times()[:2]) - load.cpu_client
    return load


def quantile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    k = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[k]


def ms(seconds: float) -> str:
    return f"{seconds * 1000:8.1f}"


def print_latency_table(groups: dict[str, list[float]], wall: float) -> None:
    print(f"{'client-side latency (ms)':<26}{'n':>8}{'req/s':>8}{'p50':>9}{'p90':>9}{'p99':>9}{'max':>9}")
    for label, values in groups.items():
        v = sorted(values)
        print(f"{label:<26}{len(v):>8}{len(v) / wall:>8.0f}{ms(quantile(v, .5))} {ms(quantile(v, .9))}"
              f" {ms(quantile(v, .99))} {ms(v[-1] if v else float('nan'))}")


def server_histogram(metrics_text: str) -> dict[tuple[str, str], dict]:
    """``sdray_http_request_duration_seconds`` per (route, method): cumulative buckets, count, sum."""
    out: dict[tuple[str, str], dict] = {}
    pattern = re.compile(r'^sdray_http_request_duration_seconds_(bucket|count|sum)\{([^}]*)\} (\S+)$')
    for line in metrics_text.splitlines():
        m = pattern.match(line)
        if not m:
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2)))
        entry = out.setdefault((labels["route"], labels["method"]), {"buckets": [], "count": 0, "sum": 0.0})
        if m.group(1) == "bucket":
            le = labels["le"]
            entry["buckets"].append((float("inf") if le == "+Inf" else float(le), float(m.group(3))))
        else:
            entry[m.group(1)] = float(m.group(3))
    return out


def histogram_quantile(q: float, buckets: list[tuple[float, float]]) -> float:
    """As Prometheus's histogram_quantile: linear interpolation inside the bucket the rank falls in."""
    buckets = sorted(buckets)
    total = buckets[-1][1] if buckets else 0
    if total == 0:
        return float("nan")
    rank = q * total
    lower, below = 0.0, 0.0
    for upper, count in buckets:
        if count >= rank:
            if upper == float("inf"):
                return lower  # beyond the last finite bucket: Prometheus answers its bound
            return lower + (upper - lower) * (rank - below) / max(count - below, 1e-12)
        lower, below = upper, count
    return lower


def subtract(after: dict, before: dict) -> dict:
    """The histogram of what happened between two scrapes (so warm-up requests do not count)."""
    out = {}
    for key, entry in after.items():
        old = before.get(key, {"buckets": [], "count": 0, "sum": 0.0})
        old_buckets = dict(old["buckets"])
        out[key] = {"buckets": [(le, c - old_buckets.get(le, 0)) for le, c in entry["buckets"]],
                    "count": entry["count"] - old["count"], "sum": entry["sum"] - old["sum"]}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=20.0, help="How long the measured load runs.")
    parser.add_argument("--max-requests", type=int, default=100_000,
                        help="Stop after this many measured requests (the load generator holds ~10 KB per request).")
    parser.add_argument("--think-ms", type=float, default=0.0,
                        help="Mean pause of each client between its requests (0: closed loop).")
    parser.add_argument("--warmup-s", type=float, default=2.0,
                        help="Load before the measured window (connections, imports, caches): not counted.")
    parser.add_argument("--poll-interval", type=float, default=None,
                        help="sdray serve --poll-interval (default: its own, 1 s).")
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="sdray-api-load-"))
    tokens_file = root / "tokens.json"
    tokens = [create_token(tokens_file, tenant) for tenant in TENANTS]
    server = Server(root, tokens_file, free_port(),
                    *(["--poll-interval", str(args.poll_interval)] if args.poll_interval is not None else []))
    try:
        load = asyncio.run(run_load(server.url, tokens, server, args.clients, args.warmup_s, args.seconds,
                                    args.max_requests, args.think_ms / 1000))
        scrape = httpx.get(server.url + "/metrics", timeout=60)
        after = server_histogram(scrape.text)
        jobs = sum(float(v) for v in re.findall(r'^sdray_jobs\{[^}]*\} (\S+)$', scrape.text, re.M))
    finally:
        server.stop()

    wall = load.wall
    mode = "closed loop" if not args.think_ms else f"think time ~{args.think_ms:g} ms per client"
    print(f"sdray serve --backend dry-run (1 uvicorn worker) on 127.0.0.1; {args.clients} clients, {mode}; "
          f"{wall:.1f} s measured after {args.warmup_s:g} s warm-up; {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"requests: {load.sent}  ({load.sent / wall:.0f}/s)   errors: {len(load.errors)}   "
          f"jobs in the store: {jobs:.0f}")
    print(f"CPU used: server {load.cpu_server:.1f} s ({100 * load.cpu_server / wall:.0f}% of a core), "
          f"load generator {load.cpu_client:.1f} s ({100 * load.cpu_client / wall:.0f}%)")
    if not args.think_ms:
        print(f"closed loop: by Little's law the mean latency is about clients / throughput = "
              f"{args.clients} / {load.sent / wall:.0f} = {1000 * args.clients * wall / max(load.sent, 1):.0f} ms")
    for line in load.errors[:10]:
        print("  error:", line)
    print()
    latencies = load.latencies
    endpoints = {"POST /v1/validate": [], "POST /v1/jobs": []}
    for label, values in latencies.items():
        endpoints["POST /v1/validate" if label.startswith("validate") else "POST /v1/jobs"].extend(values)
    everything = [v for values in latencies.values() for v in values]
    print_latency_table({**latencies, **endpoints, "all": everything}, wall)
    print()
    hist = subtract(after, load.before)
    print("server-side latency, from /metrics (sdray_http_request_duration_seconds, estimated as "
          "histogram_quantile does)")
    print(f"{'route':<26}{'n':>8}{'mean':>9}{'p50':>9}{'p90':>9}{'p99':>9}   cumulative buckets (le s: count)")
    for route in ("/v1/validate", "/v1/jobs"):
        entry = hist.get((route, "POST"))
        if not entry or not entry["count"]:
            continue
        b = entry["buckets"]
        print(f"{'POST ' + route:<26}{entry['count']:>8.0f}{ms(entry['sum'] / entry['count'])} "
              f"{ms(histogram_quantile(.5, b))} {ms(histogram_quantile(.9, b))} {ms(histogram_quantile(.99, b))}"
              "   " + " ".join(f"{le:g}:{c:.0f}" for le, c in sorted(b)))
    everything.sort()
    p99 = quantile(everything, 0.99)
    ok = p99 <= GOAL_P99_S and not load.errors and everything
    print()
    print(f"goal: p99 <= {GOAL_P99_S * 1000:.0f} ms and 0 errors: client-side p99 {p99 * 1000:.1f} ms, "
          f"{len(load.errors)} errors -> {'PASS' if ok else 'FAIL'}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
