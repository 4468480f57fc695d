"""Fault injection: what the faults of shared clusters cost a run, on a real local Ray cluster of 2 workers and
the real S3 server (SeaweedFS).

    python benchmarks/faults.py                                    # every fault, 5 trials each
    python benchmarks/faults.py --trials 1 --faults preempt worker-kill
    python benchmarks/faults.py --faults resize --strategies ddp fsdp deepspeed

Each trial runs `sdray train` (its own embedded Ray; 2 workers; data, checkpoints and outputs on S3) on a tiny
job, injects one fault at a random step, lets the run recover, and records:

- worker-kill: kill -9 one Ray Train worker process; Ray Train restarts the workers from the latest checkpoint
  (``distributed.max_failures``);
- preempt: SIGTERM to every worker (an eviction: the Ray pods' preStop hook does this); the run checkpoints
  and exits 3, and is started again with the same document (``resume: auto``);
- driver-kill: kill -9 the driver (`sdray train`) and its Ray cluster, then start the same document again;
- kill-in-save: kill -9 a worker while a checkpoint is being uploaded: a proxy in front of S3 fires the kill
  when it sees the first PUT of a checkpoint file (at the save itself, not by luck);
- s3-outage: stop the S3 server for 10–30 s mid-run (connections refused), then start it again;
- resize: train on N workers to half the steps, resume on M (2 → 1 and 1 → 2) for each strategy.

For each trial: survived (exit 0 at ``max_steps``, and the latest registered checkpoint reads back whole), steps
lost (the step at the fault, from the driver's progress lines, minus the step the run resumed from; a run that
rode through without restarting loses none), wall time lost against an uninterrupted run measured first in
the same invocation, and the final loss against that run's. Determinism: sdray does not promise equal weights
after a fault, nor between two uninterrupted runs: Ray Data's streaming split hands blocks to workers in
arrival order and its local shuffle buffer is not seeded, so the table compares the final loss instead.
Results go to stdout as a table and to ``--out`` as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import select
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sdray import storage  # noqa: E402
from sdray.s3server import s3_env, start_seaweed  # noqa: E402
from sdray.train.checkpoint import load_weights_only  # noqa: E402

FAULTS = ("worker-kill", "preempt", "driver-kill", "kill-in-save", "s3-outage", "resize")
STRATEGIES = {"ddp": {}, "fsdp": {"strategy": "fsdp"},
              "deepspeed": {"strategy": "deepspeed", "deepspeed": {"zero_stage": 2}}}


class PutWatch:
    """A TCP proxy in front of the S3 server that calls ``on_put`` the first time, once armed, a request
    line ``PUT /<bucket>/…checkpoint_…`` passes through it (then forwards it as it is)."""

    PUT = re.compile(rb"PUT /[^ ]*checkpoint_[^ ]*/(model|sharded|deepspeed)/")

    def __init__(self, target_port: int):
        self.target = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.armed = threading.Event()
        self.on_put = None
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            client, _ = self.listener.accept()
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target))
            except OSError:  # the server is down (an outage): the client sees its connection closed
                client.close()
                continue
            threading.Thread(target=self._pipe, args=(client, upstream), daemon=True).start()

    def _pipe(self, client, upstream):
        try:
            while True:
                ready, _, _ = select.select([client, upstream], [], [], 60)
                for sock in ready:
                    data = sock.recv(65536)
                    if not data:
                        return
                    if sock is client and self.armed.is_set() and self.PUT.search(data):
                        self.armed.clear()
                        self.on_put()
                    (upstream if sock is client else client).sendall(data)
        except OSError:
            return
        finally:
            client.close()
            upstream.close()


class Driver:
    """A `sdray train` process with its progress lines read: ``step`` is the last step it printed."""

    def __init__(self, doc: dict, workdir: Path, env: dict):
        path = workdir / f"job-{time.monotonic_ns()}.yaml"
        path.write_text(yaml.safe_dump(doc))
        self.proc = subprocess.Popen([sys.executable, "-m", "sdray.cli", "train", str(path)], cwd=ROOT,
                                     env={**os.environ, **env, "SDRAY_PROGRESS_INTERVAL": "0"},
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                     start_new_session=True)
        self.step = 0
        self.tail: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stderr:
            self.tail = (self.tail + [line.rstrip()])[-30:]
            found = re.search(r"\| step (\d+)", line)
            if found:
                self.step = int(found[1])

    def wait_step(self, step: int, timeout: float = 900) -> None:
        deadline = time.monotonic() + timeout
        while self.step < step:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the run ended or stalled before step {step}: " + "\n".join(self.tail[-10:]))
            time.sleep(0.2)  # polling the progress the reader thread parses

    def workers(self) -> list[psutil.Process]:
        try:
            return [p for p in psutil.Process(self.proc.pid).children(recursive=True)
                    if "RayTrainWorker" in " ".join(p.cmdline())]
        except psutil.Error:
            return []

    def wait(self, timeout: float = 1800) -> int:
        return self.proc.wait(timeout=timeout)

    def kill_tree(self) -> None:
        """SIGKILL the driver and everything it started (its Ray cluster), by PID."""
        try:
            victims = [psutil.Process(self.proc.pid), *psutil.Process(self.proc.pid).children(recursive=True)]
        except psutil.Error:
            victims = []
        for p in victims:
            try:
                p.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(victims, timeout=30)
        self.proc.wait(timeout=30)


class Bench:
    def __init__(self, args):
        self.args = args
        self.rng = random.Random(args.seed)
        self.workdir = Path(tempfile.mkdtemp(prefix="sdray-faults-"))
        self.s3 = start_seaweed(self.workdir / "weed")
        for bucket in ("data", "runs"):
            self.s3.create_bucket(bucket)
        self.proxy = PutWatch(self.s3.ports["s3"])
        self.env = {**s3_env(self.s3), "AWS_ENDPOINT_URL": f"http://127.0.0.1:{self.proxy.port}"}
        os.environ.update(self.env)  # this process reads summaries and checkpoints through the same endpoint
        subprocess.run([sys.executable, "-m", "sdray.cli", "data", "import-digits", "s3://data/digits", "--format",
                        "parquet"], cwd=ROOT, check=True, capture_output=True, env={**os.environ, **self.env})
        self.trial = 0

    def doc(self, name: str, workers: int = 2, strategy: str = "ddp", max_steps: int | None = None) -> dict:
        a = self.args
        return {"apiVersion": "sdray.io/v1alpha1", "kind": "DiffusionJob", "metadata": {"name": name},
                "spec": {"model": {"preset": "tiny"}, "data": {"uri": "s3://data/digits", "format": "parquet"},
                         "train": {"max_steps": max_steps or a.steps, "batch_size": 8, "learning_rate": 1e-3,
                                   "log_every_n_steps": 1},
                         "distributed": {"num_workers": workers, "resources_per_worker": {"CPU": 1},
                                         "max_failures": 2, **STRATEGIES[strategy]},
                         "checkpoint": {"every_n_steps": a.every, "keep_last": 3},
                         "output": {"uri": f"s3://runs/{name}/out"}}}

    def summary(self, name: str) -> dict:
        return json.loads(storage.read_bytes(f"s3://runs/{name}/out/summary.json"))

    def latest_checkpoint_whole(self, name: str) -> bool:
        """The latest registered checkpoint reads back: manifest, trainer state, every listed weights file."""
        run = f"s3://runs/{name}/out/checkpoints/{name}"
        snapshot = json.loads(storage.read_bytes(f"{run}/checkpoint_manager_snapshot.json"))
        results = snapshot["checkpoint_results"]
        if not results:
            return False
        latest = max(results, key=lambda r: r["metrics"]["step"])
        local = Path(storage.local_copy(f"{run}/{latest['checkpoint_dir_name']}"))
        manifest = json.loads((local / "sdray_checkpoint.json").read_text())
        load_weights_only(local / "trainer_state.pt")
        return manifest["step"] == latest["metrics"]["step"]

    def name(self, fault: str) -> str:
        self.trial += 1
        return f"{fault}-{self.trial}"

    # -- one trial of each fault ---------------------------------------------------------------------------
    def uninterrupted(self) -> dict:
        name = self.name("baseline")
        start = time.monotonic()
        driver = Driver(self.doc(name), self.workdir, self.env)
        code = driver.wait()
        if code != 0:
            raise SystemExit(f"the uninterrupted run failed ({code}):\n" + "\n".join(driver.tail))
        return {"fault": "none", "survived": code == 0, "wall_s": time.monotonic() - start,
                "loss": self.summary(name).get("loss") if code == 0 else None}

    def _at_random_step(self) -> int:
        return self.rng.randint(self.args.every + 2, self.args.steps - self.args.every)

    def _finish(self, fault: str, name: str, start: float, code: int, at_step: int, extra: dict | None = None):
        survived = False
        resumed = loss = None
        if code == 0:
            summary = self.summary(name)
            resumed, loss = summary.get("resumed_from"), summary.get("loss")
            survived = summary["step"] == self.args.steps and self.latest_checkpoint_whole(name)
        lost = at_step - (resumed if resumed is not None else at_step)
        return {"fault": fault, "survived": survived, "at_step": at_step, "resumed_from": resumed,
                "steps_lost": lost, "wall_s": time.monotonic() - start, "loss": loss, **(extra or {})}

    def worker_kill(self) -> dict:
        name, start, at = self.name("worker-kill"), time.monotonic(), self._at_random_step()
        driver = Driver(self.doc(name), self.workdir, self.env)
        driver.wait_step(at)
        at = driver.step
        self.rng.choice(driver.workers()).kill()
        return self._finish("worker-kill", name, start, driver.wait(), at)

    def preempt(self) -> dict:
        name, start, at = self.name("preempt"), time.monotonic(), self._at_random_step()
        driver = Driver(self.doc(name), self.workdir, self.env)
        driver.wait_step(at)
        noticed = time.monotonic()
        for worker in driver.workers():
            worker.send_signal(signal.SIGTERM)
        code = driver.wait()
        stop_s = time.monotonic() - noticed
        stopped = self.summary(name) if code == 3 else {}
        if code != 3:
            return {"fault": "preempt", "survived": False, "exit": code, "wall_s": time.monotonic() - start}
        code = Driver(self.doc(name), self.workdir, self.env).wait()
        return self._finish("preempt", name, start, code, stopped["step"], {"stop_s": stop_s})

    def driver_kill(self) -> dict:
        name, start, at = self.name("driver-kill"), time.monotonic(), self._at_random_step()
        driver = Driver(self.doc(name), self.workdir, self.env)
        driver.wait_step(at)
        at = driver.step
        driver.kill_tree()
        return self._finish("driver-kill", name, start, Driver(self.doc(name), self.workdir, self.env).wait(), at)

    def kill_in_save(self) -> dict:
        name, start = self.name("kill-in-save"), time.monotonic()
        driver = Driver(self.doc(name), self.workdir, self.env)
        driver.wait_step(self.args.every + 1)  # after the first checkpoint: the fault hits the second save
        fired = {}

        def kill():
            fired["at"] = driver.step
            workers = driver.workers()
            if workers:
                self.rng.choice(workers).kill()

        self.proxy.on_put = kill
        self.proxy.armed.set()
        code = driver.wait()
        self.proxy.armed.clear()
        return self._finish("kill-in-save", name, start, code, fired.get("at", 0), {"fired": "at" in fired})

    def s3_outage(self) -> dict:
        name, start, at = self.name("s3-outage"), time.monotonic(), self._at_random_step()
        driver = Driver(self.doc(name), self.workdir, self.env)
        driver.wait_step(at)
        at = driver.step
        outage = self.rng.uniform(10, 30)
        self.s3.stop()
        time.sleep(outage)  # the outage itself: how long the server stays down
        self.s3.start_again()
        return self._finish("s3-outage", name, start, driver.wait(), at, {"outage_s": round(outage, 1)})

    def resize(self, strategy: str, before: int, after: int) -> dict:
        name, start = self.name(f"resize-{strategy}-{before}to{after}"), time.monotonic()
        half = self.args.steps // 2
        first = Driver(self.doc(name, before, strategy, max_steps=half), self.workdir, self.env).wait()
        if first != 0:
            return {"fault": f"resize {strategy} {before}→{after}", "survived": False, "exit": first,
                    "wall_s": time.monotonic() - start}
        code = Driver(self.doc(name, after, strategy), self.workdir, self.env).wait()
        result = self._finish(f"resize {strategy} {before}→{after}", name, start, code, half)
        if code == 0:
            result["elastic"] = (self.summary(name).get("elastic") or {}).get("note")
        return result


def table(rows: list[dict], baseline: dict) -> str:
    by_fault: dict[str, list[dict]] = {}
    for row in rows:
        by_fault.setdefault(row["fault"], []).append(row)
    lines = ["| fault | trials survived | steps lost (each) | wall time lost, s (median) | final loss (median) |",
             "|---|---|---|---|---|",
             f"| none (baseline) | {int(baseline['survived'])}/1 | 0 | 0 | {baseline['loss']:.4f} |"]
    for fault, trials in by_fault.items():
        survived = sum(t["survived"] for t in trials)
        lost = ", ".join(str(t.get("steps_lost", "-")) for t in trials)
        wall = statistics.median(t["wall_s"] - baseline["wall_s"] for t in trials)
        losses = [t["loss"] for t in trials if t.get("loss") is not None]
        loss = f"{statistics.median(losses):.4f}" if losses else "-"
        lines.append(f"| {fault} | {survived}/{len(trials)} | {lost} | {wall:.0f} | {loss} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=5, help="trials of each fault (default 5)")
    parser.add_argument("--faults", nargs="+", default=list(FAULTS), choices=FAULTS)
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=list(STRATEGIES),
                        help="strategies the resize fault runs (default all)")
    parser.add_argument("--steps", type=int, default=60, help="max_steps of each run (default 60)")
    parser.add_argument("--every", type=int, default=10, help="checkpoint.every_n_steps (default 10)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("faults-results.json"))
    args = parser.parse_args()
    bench = Bench(args)
    try:
        baseline = bench.uninterrupted()
        print(f"baseline: {baseline['wall_s']:.0f} s, loss {baseline['loss']}", flush=True)
        rows = []
        # Round by round (one trial of each fault per round): a run cut short still has every fault in it.
        for trial in range(args.trials):
            for fault in args.faults:
                if fault == "resize":
                    runs = [(s, b, a) for s in args.strategies for b, a in ((2, 1), (1, 2))]
                    results = [bench.resize(*r) for r in runs]
                else:
                    results = [getattr(bench, fault.replace("-", "_"))()]
                for result in results:
                    rows.append(result)
                    print(json.dumps(result), flush=True)
                    args.out.write_text(json.dumps({"baseline": baseline, "trials": rows}, indent=2))
        print(table(rows, baseline))
    finally:
        bench.s3.stop()


if __name__ == "__main__":
    main()
