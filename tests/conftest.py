"""Shared fixtures: one real SeaweedFS S3 server and one local Ray cluster per test session."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import yaml

import pytest

from sdray.s3server import SeaweedS3, s3_env, start_seaweed

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@contextlib.contextmanager
def recorded_calls(module):
    """The keyword arguments of each call of ``module`` inside the block, in order (diffusers' pipelines
    call their denoiser by keyword)."""
    calls: list[dict] = []
    handle = module.register_forward_pre_hook(lambda _module, _args, kwargs: calls.append(kwargs), with_kwargs=True)
    try:
        yield calls
    finally:
        handle.remove()


def make_job(name: str, output: Path, data_uri: str, **spec) -> dict:
    """A small tiny-preset job document; ``spec`` sections are merged over the defaults."""
    doc = {
        "apiVersion": "sdray.io/v1alpha1",
        "kind": "DiffusionJob",
        "metadata": {"name": name},
        "spec": {
            "model": {"preset": "tiny"},
            "data": {"uri": data_uri},
            "train": {"max_steps": 20, "batch_size": 16, "learning_rate": 1e-3, "log_every_n_steps": 5},
            "distributed": {"num_workers": 1},
            "checkpoint": {"every_n_steps": 10, "keep_last": 2},
            "output": {"uri": str(output)},
        },
    }
    for section, values in spec.items():
        if isinstance(values, dict) and isinstance(doc["spec"].get(section), dict):
            doc["spec"][section] = {**doc["spec"][section], **values}
        else:
            doc["spec"][section] = values
    return doc


def wait_for(condition, timeout: float, what: str, proc=None, *, interval: float = 0.2, timed_out=None):
    """Poll ``condition`` every ``interval`` s until it returns something true, and return that. Fails after
    ``timeout`` s with AssertionError, or with the exception ``timed_out()`` returns (to say more), and at
    once when ``proc`` has exited. The tests' one way of waiting."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process exited ({proc.returncode}) before: {what}")
        if time.monotonic() >= deadline:
            raise timed_out() if timed_out is not None else AssertionError(f"timed out waiting for {what}")
        time.sleep(interval)  # polling interval, bounded by the deadline


def start_cli(command: str, doc: dict, path: Path) -> subprocess.Popen:
    """Write ``doc`` to ``path`` and start ``sdray COMMAND path`` as its own process (with its own embedded
    Ray), for tests that kill it; stop it with ``kill_tree``."""
    path.write_text(yaml.safe_dump(doc))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return subprocess.Popen([sys.executable, "-m", "sdray.cli", command, str(path)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL a process started by a test and everything it started (its Ray cluster too), by PID."""
    victims = [proc, *psutil.Process(proc.pid).children(recursive=True)] if proc.poll() is None else []
    for p in victims:
        try:
            os.kill(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=30)
    psutil.wait_procs([p for p in victims[1:] if isinstance(p, psutil.Process)], timeout=30)


@pytest.fixture(scope="session", autouse=True)
def download_cache(tmp_path_factory) -> Path:
    """A private per-session cache for S3 downloads (before Ray starts: its workers inherit it)."""
    root = tmp_path_factory.mktemp("sdray-cache")
    saved = os.environ.get("SDRAY_CACHE_DIR")
    os.environ["SDRAY_CACHE_DIR"] = str(root)
    yield root
    if saved is None:
        os.environ.pop("SDRAY_CACHE_DIR", None)
    else:
        os.environ["SDRAY_CACHE_DIR"] = saved


@pytest.fixture(scope="session")
def seaweed(tmp_path_factory) -> SeaweedS3:
    server = start_seaweed(tmp_path_factory.mktemp("seaweed"))
    # Before Ray starts, so every Ray worker inherits the credentials (as a pod would from a Secret).
    saved = {k: os.environ.get(k) for k in s3_env(server)}
    os.environ.update(s3_env(server))
    yield server
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def ray_session(seaweed):
    """A local Ray cluster for the session (4 logical CPUs: 2 workers + room for Ray Data)."""
    import ray

    from sdray.data.pipeline import quiet_ray_data
    from sdray.train.launch import RAY_ENV

    ray.init(address="local", num_cpus=4, _node_ip_address="127.0.0.1", runtime_env={"env_vars": RAY_ENV},
             logging_level="WARNING", log_to_driver=False)
    quiet_ray_data()
    ray_threads = set(threading.enumerate())  # Ray's own (error listener, GC thread): shutdown stops them
    yield ray
    _stop_ray_data_executors()
    _join_late_threads(ray_threads, timeout=20)
    ray.shutdown()


def _join_late_threads(known: set, timeout: float) -> None:
    """Give the threads the tests' libraries left behind (Tune, Train and Ray Data helpers waiting on an
    actor that the collection above has just ended) ``timeout`` s to finish before ``ray.shutdown()``:
    one that wakes after it touches a shut-down core worker, which ends this process at once, before
    pytest reports (seen once with every test passed). Threads still running then are left as they are."""
    deadline = time.monotonic() + timeout
    for thread in threading.enumerate():
        if thread in known or thread is threading.current_thread() or type(thread).__name__ in ("TMonitor",
                                                                                                   "_DummyThread"):
            continue  # (tqdm's monitor sleeps for the process's life; a thread threading did not start, one of
            # Arrow's or Ray's native threads that ran Python, cannot be joined)
        thread.join(timeout=max(0.0, deadline - time.monotonic()))


def _stop_ray_data_executors() -> None:
    """Shut down the streaming executors of datasets the tests left half-read. Their threads keep
    reporting to Ray; one that does so after ``ray.shutdown()`` makes Ray's core worker end this process
    at once ("The core worker has already been shutdown ... The process will exit"), before pytest has
    written its summary or its exit status."""
    import gc
    import threading

    from ray.data._internal.execution.streaming_executor import StreamingExecutor

    gc.collect()  # iterators that are garbage shut their executors down as they are collected
    executors = [t for t in threading.enumerate() if isinstance(t, StreamingExecutor)]
    for executor in executors:
        executor.shutdown(force=True)
    for executor in executors:
        executor.join(timeout=30)


@pytest.fixture(scope="session")
def digits_root(tmp_path_factory) -> Path:
    """The digits (400 of them, 16 px) in all three formats, on local disk."""
    from sdray.data.digits import import_digits

    root = tmp_path_factory.mktemp("digits")
    for fmt in ("imagefolder", "webdataset", "parquet"):
        import_digits(str(root / fmt), fmt, 16, limit=400)
    return root


@pytest.fixture(scope="session")
def digits_s3(seaweed, digits_root) -> str:
    """The same digits in all three formats on the SeaweedFS server, under s3://digits/<format>."""
    from sdray import storage

    seaweed.create_bucket("digits")
    for fmt in ("imagefolder", "webdataset", "parquet"):
        storage.upload_dir(digits_root / fmt, f"s3://digits/{fmt}")
    return "s3://digits"
