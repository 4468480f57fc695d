"""The ``sdray`` command line: validate, train, tune, sample, import data, run the demo.

Every command reports bad input as one clear message and an exit code (2: the document or arguments
are wrong; 1: the run failed; 3: preempted, or a followed job cancelled or preempted; 4: ``--timeout``
passed), never a traceback. ``--output json|yaml`` (``jobs``, ``status``, ``validate``) prints only the
machine-readable form on stdout; messages go to stderr.
"""

from __future__ import annotations

import contextlib
import enum
import json
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.progress import Progress as ProgressBar
from rich.table import Table

from sdray import run
from sdray.progress import Progress, ProgressLines
from sdray.spec import DiffusionJob, SpecError, json_schema, load_job

app = typer.Typer(
    help="Train Stable-Diffusion-family text-to-image models on Ray from one job document "
    "(apiVersion: sdray.io/v1alpha1, kind: DiffusionJob).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
data_app = typer.Typer(help="Prepare datasets in object storage.", no_args_is_help=True)
app.add_typer(data_app, name="data")

out = Console()
err = Console(stderr=True)

EXIT_BAD_INPUT = 2
EXIT_FAILED = 1
EXIT_PREEMPTED = 3  # stopped on a preemption notice with a checkpoint: start the same document again
EXIT_CANCELLED = 3  # `submit --wait`: the job was cancelled or preempted (it did not fail; it did not finish)
EXIT_TIMEOUT = 4  # `submit --wait --timeout`: the job had not ended (it goes on)


class Output(str, enum.Enum):
    """How ``jobs``, ``status`` and ``validate`` print: a table for people, JSON or YAML for scripts."""

    table = "table"
    json = "json"
    yaml = "yaml"


OutputOption = Annotated[Output, typer.Option(
    "--output", "-o", help="table (for people), or json / yaml (for scripts: only that on stdout, stable keys).")]


def _emit(data: Any, output: Output) -> None:
    """``data`` on stdout as JSON or YAML, and nothing else."""
    if output == Output.json:
        sys.stdout.write(json.dumps(data, indent=2) + "\n")
    else:
        import yaml

        sys.stdout.write(yaml.safe_dump(data, sort_keys=False, allow_unicode=True))


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            print(f"sdray {version('sdray')}")
        except PackageNotFoundError:  # a source tree that was never installed
            print("sdray (not installed: no package metadata)")
        raise typer.Exit()


@app.callback()
def _main(
    show_version: Annotated[bool, typer.Option(
        "--version", callback=_version, is_eager=True, help="Print the version and exit.")] = False,
) -> None:
    """Train Stable-Diffusion-family text-to-image models on Ray from one job document (apiVersion:
    sdray.io/v1alpha1, kind: DiffusionJob)."""


def _fail(message: str, code: int = EXIT_FAILED) -> typer.Exit:
    err.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)  # one line, whatever the width
    return typer.Exit(code)


def _load(path: Path, output: Output = Output.table):
    try:
        return load_job(path)
    except SpecError as exc:
        err.print(f"[bold red]invalid job document[/] {exc.source}:", highlight=False)
        for line in exc.errors:
            err.print(f"  - {line}", highlight=False, markup=False, soft_wrap=True)
        if output != Output.table:
            _emit({"valid": False, "source": str(exc.source or path), "errors": list(exc.errors)}, output)
        raise typer.Exit(EXIT_BAD_INPUT) from None


@app.command()
def validate(
    job: Annotated[Path, typer.Argument(help="Job document (YAML or JSON).")],
    output: OutputOption = Output.table,
) -> None:
    """Check a job document against the schema: prints `ok` and a summary, or every error (exit 2).

    With --output json|yaml: {valid, name, namespace, kind, stage, family, model, data, steps, batch_size,
    workers, strategy, output}, or {valid: false, source, errors} (exit 2)."""
    doc = _load(job, output)
    s = doc.spec
    model = s.model.preset or s.model.pretrained
    from sdray.models.presets import PRESETS

    # the family as far as the document tells (a pretrained pipeline's own is read when the job runs)
    family = s.model.family or (PRESETS[s.model.preset].family if s.model.preset else None)
    if output != Output.table:
        _emit({"valid": True, "name": doc.metadata.name, "namespace": doc.metadata.namespace,
               "kind": "tune" if s.tune else "train", "stage": s.stage, "family": family, "model": model,
               "data": {"uri": s.data.uri, "format": s.data.format}, "steps": s.train.max_steps,
               "batch_size": s.train.batch_size, "workers": s.distributed.num_workers,
               "strategy": s.distributed.strategy, "output": s.output.uri}, output)
        return
    out.print("ok", highlight=False)
    shown_family = family or "the pipeline's"
    out.print(
        f"{doc.metadata.name}: stage={s.stage} family={shown_family} model={model} data={s.data.uri} ({s.data.format}) "
        f"steps={s.train.max_steps} batch={s.train.batch_size}x{s.distributed.num_workers} workers "
        f"strategy={s.distributed.strategy} output={s.output.uri}",
        highlight=False, markup=False,
    )


@app.command()
def schema(
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Write to this file instead of stdout.")] = None,
) -> None:
    """Print the JSON Schema of the DiffusionJob document."""
    text = json.dumps(json_schema(), indent=2)
    if output:
        output.write_text(text + "\n")
    else:
        sys.stdout.write(text + "\n")


def _print_summary(summary: dict, title: str) -> None:
    table = Table(title=title, show_header=False, title_justify="left")
    for key in ("step", "loss", "resumed_from", "pipeline", "vae", "samples", "metrics", "checkpoint",
                "skipped_images", "scaling_factor", "shift_factor"):
        if summary.get(key) is not None:
            value = summary[key]
            table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
    out.print(table)


def _shown_on(bar: ProgressBar, task, **columns: tuple[str, str | None]) -> Callable[[Progress], None]:
    """A progress callback that sets each of ``task``'s ``columns`` (``completed`` too) from a field of the
    progress, formatted (None: as it is). Not every update carries every field (a checkpoint or a sample grid
    comes alone): a column keeps its last value until one does."""

    def show(progress: Progress) -> None:
        values = {column: (getattr(progress, field), form) for column, (field, form) in columns.items()}
        bar.update(task, **{column: value if form is None else form.format(value)
                            for column, (value, form) in values.items() if value is not None})

    return show


def _progress_display(name: str, total: int | None, bar_columns: tuple, **shown: tuple[str, str | None]):
    """(context, callback) showing a run's progress: a live bar on a terminal; elsewhere (kubectl logs, a file,
    CI) one line every $SDRAY_PROGRESS_INTERVAL seconds (default 30) on stderr."""
    if err.is_terminal:
        bar = ProgressBar(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), *bar_columns,
                          console=err, transient=False)
        task = bar.add_task(name, total=total, **{column: "-" for column in shown if column != "completed"})
        return bar, _shown_on(bar, task, **shown)
    import contextlib
    import os

    lines = ProgressLines(name, lambda line: print(line, file=sys.stderr, flush=True),
                          interval_s=float(os.environ.get("SDRAY_PROGRESS_INTERVAL", "30")))

    @contextlib.contextmanager
    def flushed():
        try:
            yield
        finally:
            lines.flush()  # the last state, whatever the interval

    return flushed(), lines


def _train(doc: DiffusionJob, *, address: str | None = None, in_process: bool = False,
           verbose: bool = False) -> dict:
    """Train one job showing its progress and print its summary; returns the summary (exits cleanly on errors)."""
    run.configure_logging(verbose)
    # (the last update is where the run ended: a run resumed at its last step reports no step before it)
    display, show = _progress_display(
        f"{doc.metadata.name} ({doc.spec.stage})", doc.spec.train.max_steps,
        (TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[ips]} img/s"), TimeElapsedColumn(),
         TimeRemainingColumn()),
        completed=("step", None), loss=("loss", "{:.4f}"), ips=("images_per_s", "{:.0f}"))
    try:
        with display:
            summary = run.train(doc, address=address, in_process=in_process, on_progress=show, worker_logs=verbose)
    except run.expected_errors() as exc:
        raise _fail(str(exc)) from None
    if summary.get("status") == "preempted":
        _print_summary(summary, f"{doc.metadata.name}: preempted at step {summary.get('step')}, checkpointed: "
                                "start the same document again to continue (checkpoint.resume: auto)")
    else:
        _print_summary(summary, f"{doc.metadata.name}: done")
    return summary


@app.command()
def train(
    job: Annotated[Path, typer.Argument(help="Job document (YAML or JSON).")],
    address: Annotated[str | None, typer.Option(
        help="Ray cluster: 'auto' (a running local cluster), 'ray://host:10001', or omit for an embedded one.")] = None,
    in_process: Annotated[bool, typer.Option(
        "--in-process", help="Run the loop as one plain process (no Ray Train): debugging, single GPU.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show Ray's and the workers' logs.")] = False,
) -> None:
    """Train a job document on Ray (an embedded local cluster unless --address is given).

    Ray Data streams the dataset from spec.data.uri, Ray Train runs the loop on spec.distributed.num_workers
    workers, and the exported diffusers pipeline, sample grids, metrics.jsonl and loss.png land under
    spec.output.uri. Rerunning a job with checkpoint.resume: auto continues from its latest checkpoint.

    On SIGTERM (a Kubernetes eviction or preemption; checkpoint.on_preemption) the workers finish their step
    and checkpoint, and the command exits with status 3 ("preempted"): start it again to continue.
    """
    if _train(_load(job), address=address, in_process=in_process, verbose=verbose).get("status") == "preempted":
        raise typer.Exit(EXIT_PREEMPTED)


@app.command("preemption-notice")
def preemption_notice(
    timeout: Annotated[float, typer.Option(help="Seconds to wait for them to checkpoint and end.")] = 110,
) -> None:
    """Tell the training runs on this machine they are being preempted, and wait for them to checkpoint.

    Sends SIGTERM once to every sdray train/tune driver and Ray Train worker here and waits until they end
    (at most --timeout seconds). The rendered Ray pods run it as their preStop hook: Kubernetes signals only
    a container's first process (Ray), so without it a run would not hear the notice.
    """
    from sdray.train.preemption import notify_local

    told = notify_local(timeout)
    out.print(f"told {len(told)} process(es): {' '.join(map(str, told)) or '-'}")


@app.command()
def tune(
    job: Annotated[Path, typer.Argument(help="Job document (YAML or JSON) with a spec.tune section.")],
    address: Annotated[str | None, typer.Option(
        help="Ray cluster: 'auto', 'ray://host:10001', or omit for an embedded one.")] = None,
    resume: Annotated[bool, typer.Option(
        "--resume", help="Continue an interrupted search: finished trials are kept, unfinished ones continue "
        "from their last checkpoint.")] = False,
    resume_if_exists: Annotated[bool, typer.Option(
        "--resume-if-exists", help="Continue this job's search if the same spec started one (with "
        "checkpoint.resume: auto, as training does), else start it. RayJobs and the service run searches "
        "this way, so a retried driver continues instead of starting over.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show Ray's and the workers' logs.")] = False,
) -> None:
    """Search hyperparameters (spec.tune) with Ray Tune: one full Ray Train run of the job per trial.

    ASHA stops weak trials early; PBT lets weak trials copy strong ones' checkpoints and perturb their values.
    Writes results.parquet, tune.png (metric against learning rate, coloured by batch size), best.yaml (the
    document with the best values, ready for `sdray train`) and the best trial's pipeline to spec.output.uri.
    """
    doc = _load(job)
    if doc.spec.tune is None:
        raise _fail(f"{job}: spec.tune is missing: add a search (see README), or run `sdray train`", EXIT_BAD_INPUT)
    run.configure_logging(verbose)
    from sdray.tuning import planned_trials

    display, show = _progress_display(f"{doc.metadata.name}: trials", planned_trials(doc.spec.tune),
                                      (TextColumn("best {task.fields[best]}"), TimeElapsedColumn()),
                                      completed=("trials_ended", None), best=("best", "{:.4f}"))
    try:
        with display:
            summary = run.tune(doc, address=address, resume=resume, resume_if_exists=resume_if_exists,
                               on_progress=show, worker_logs=verbose)
    except run.expected_errors() as exc:
        raise _fail(str(exc)) from None
    _print_trials(doc, summary)


def _print_trials(doc: DiffusionJob, summary: dict) -> None:
    """A search's results: one row per trial (its values, metric, step, status; the best in green), then
    where the outputs are."""
    metric = summary["metric"]
    table = Table(title=f"{doc.metadata.name}: {len(summary['trials'])} trials ({metric}, {summary['mode']})",
                  title_justify="left")
    keys = sorted({k for t in summary["trials"] for k in t["params"]})
    for column in ("trial", *keys, metric, "step", "status"):
        table.add_column(column)
    best = summary["best"]["trial"]
    for t in sorted(summary["trials"], key=lambda t: (t["metric"] is None, t["metric"] or 0.0)):
        value = "-" if t["metric"] is None else f"{t['metric']:.4f}"
        status = t["status"] + (f": {t['error']}" if t["error"] else "")
        style = "bold green" if t["trial"] == best else None
        table.add_row(t["trial"], *[_short(t["params"].get(k)) for k in keys], value, str(t["step"]), status,
                      style=style)
    out.print(table)
    for key in ("pipeline", "best_job", "results", "plot"):
        out.print(f"{key}: {summary[key]}", highlight=False)


def _short(value) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


@app.command()
def sample(
    pipeline: Annotated[str, typer.Argument(help="Pipeline dir or s3:// URI (or a job's output.uri).")],
    prompt: Annotated[list[str], typer.Option("--prompt", "-p", help="Prompt; repeat for several.")],
    num: Annotated[int, typer.Option("--num", "-n", min=1, help="Images per prompt.")] = 4,
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Folder for the PNGs and grid.png.")] = Path("samples"),
    steps: Annotated[int, typer.Option(min=1, help="Denoising steps.")] = 25,
    guidance: Annotated[float, typer.Option(min=0.0, help="Classifier-free guidance scale (Flux: true CFG "
                                            "against the empty prompt; the embedded guidance stays 1.0, as trained).")] = 5.0,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    endpoint: Annotated[str | None, typer.Option(help="S3 endpoint for s3:// URIs.")] = None,
) -> None:
    """Generate images from a trained pipeline (stock diffusers): one PNG per image and a grid."""
    run.configure_logging()
    from sdray.models.pipeline import generate, load_pipeline
    from sdray.spec import S3Settings
    from sdray.train.reporting import image_grid

    try:
        pipe = load_pipeline(pipeline, S3Settings(endpoint=endpoint))
    except (*run.expected_errors(), FileNotFoundError) as exc:
        raise _fail(f"cannot load a pipeline from {pipeline}: {exc}", EXIT_BAD_INPUT) from None
    rows = generate(pipe, prompt, images_per_prompt=num, num_inference_steps=steps, guidance_scale=guidance, seed=seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    for p, row in enumerate(rows):
        for i, img in enumerate(row):
            img.save(out_dir / f"prompt{p:02d}_{i:03d}.png")
    image_grid(rows, prompt).save(out_dir / "grid.png")
    out.print(f"wrote {sum(len(r) for r in rows)} images and grid.png to {out_dir}", highlight=False)


@data_app.command("import-digits")
def import_digits(
    uri: Annotated[str, typer.Argument(help="Destination: a local path or s3://bucket/prefix.")],
    format: Annotated[str, typer.Option("--format", "-f", help="imagefolder, webdataset or parquet.")] = "imagefolder",
    resolution: Annotated[int, typer.Option(min=8, help="Image size in pixels.")] = 16,
    endpoint: Annotated[str | None, typer.Option(help="S3 endpoint for s3:// URIs (or AWS_ENDPOINT_URL).")] = None,
) -> None:
    """Write scikit-learn's 1,797 handwritten digits as an image–caption dataset.

    Each 8×8 scan is upscaled to --resolution and captioned "a handwritten digit 7".
    """
    from sdray.data.digits import import_digits as write
    from sdray.spec import S3Settings

    if format not in ("imagefolder", "webdataset", "parquet"):
        raise _fail(f"--format: expected imagefolder, webdataset or parquet, got {format!r}", EXIT_BAD_INPUT)
    try:
        n = write(uri, format, resolution, S3Settings(endpoint=endpoint))
    except run.expected_errors() as exc:
        raise _fail(f"cannot write {uri}: {exc}") from None
    out.print(f"wrote {n} digits ({format}, {resolution}px) to {uri}", highlight=False)


@data_app.command("precompute")
def precompute(
    job: Annotated[Path, typer.Argument(help="Job document (YAML or JSON) whose data, model and transforms to use.")],
    out_uri: Annotated[str | None, typer.Option(
        "--out", "-o", help="Where the cache goes (local or s3://); default: <data.uri>-latents.")] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Images per encoder call.")] = 64,
    concurrency: Annotated[int | None, typer.Option(
        min=1, help="Encoder actors (one GPU each with distributed.use_gpu); default: distributed.num_workers.")] = None,
    dtype: Annotated[str, typer.Option(help="Stored precision: float32 or float16 (half the size).")] = "float32",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace what --out already holds.")] = False,
    address: Annotated[str | None, typer.Option(
        help="Ray cluster: 'auto', 'ray://host:10001', or omit for an embedded one.")] = None,
) -> None:
    """Encode a job's dataset once with its frozen VAE and text encoder(s) into a latent cache.

    Writes parquet shards, unconditional.safetensors and manifest.json to --out. Train on it with the same
    job, data.uri set to the cache and data.format: latents (the VAE and text encoders are then not run
    for training steps). A cache made with another VAE, text encoder, resolution or transform is refused.
    """
    doc = _load(job)
    run.configure_logging()
    from sdray.data.precompute import precompute as encode
    from sdray.train.launch import ray_cluster

    lines = None if err.is_terminal else _progress_display(f"{doc.metadata.name}: precompute", None, ())
    try:
        with ray_cluster(doc, address, log_to_driver=False), lines[0] if lines else contextlib.nullcontext():
            manifest = encode(doc, out_uri, batch_size=batch_size, concurrency=concurrency, dtype=dtype,
                              overwrite=overwrite, progress=err.is_terminal, on_progress=lines[1] if lines else None)
    except run.expected_errors() as exc:
        raise _fail(str(exc)) from None
    table = Table(title=f"{doc.metadata.name}: latent cache written", show_header=False, title_justify="left")
    for key in ("uri", "rows", "skipped_images", "dtype", "scaling_factor", "elapsed_s"):
        table.add_row(key, str(manifest[key]))
    table.add_row("columns", ", ".join(manifest["columns"]))
    out.print(table)


# -- the service and its client -------------------------------------------------------------------------
token_app = typer.Typer(help="Bearer tokens of the sdray service.", no_args_is_help=True)
app.add_typer(token_app, name="token")
DEFAULT_TOKENS = Path.home() / ".config" / "sdray" / "tokens.json"


@token_app.command("create")
def token_create(
    tenant: Annotated[str, typer.Option(help="Tenant the token acts for (a DNS-1123 label).")],
    role: Annotated[str, typer.Option(help="user (own jobs only) or admin (sees every tenant's jobs).")] = "user",
    tokens: Annotated[Path, typer.Option(help="Tokens file the service reads (only the hash is stored).")] = DEFAULT_TOKENS,
) -> None:
    """Create a token for a tenant and print it: this is the only time it is shown."""
    from sdray.service.auth import AuthFileError, create_token

    try:
        token = create_token(tokens, tenant, role)
    except AuthFileError as exc:
        raise _fail(str(exc), EXIT_BAD_INPUT) from None
    err.print(f"token for tenant {tenant!r} ({role}) added to {tokens}; it is not shown again:", highlight=False)
    print(token)


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    tokens: Annotated[Path, typer.Option(help="Tokens file (`sdray token create` writes it).")] = DEFAULT_TOKENS,
    db: Annotated[Path, typer.Option(help="SQLite job store (WAL mode).")] = Path.home() / ".local/share/sdray/jobs.db",
    backend: Annotated[str, typer.Option(help="local (Ray jobs), kuberay (DiffusionJobs) or dry-run.")] = "local",
    ray_address: Annotated[str | None, typer.Option(
        help="local backend: a Ray dashboard to join (http://127.0.0.1:8265); default: start one for the service.")] = None,
    num_cpus: Annotated[int | None, typer.Option(help="local backend: CPUs of the Ray cluster it starts.")] = None,
    namespace: Annotated[str, typer.Option(help="kuberay backend: namespace of the DiffusionJobs.")] = "default",
    public_url: Annotated[str | None, typer.Option(
        help="URL the job drivers post progress to (default: http://HOST:PORT).")] = None,
    poll_interval: Annotated[float, typer.Option(help="Seconds between looks at running jobs.")] = 1.0,
    policy: Annotated[Path | None, typer.Option(
        help="Tenant policy (YAML): the paths, endpoints, secrets, ServiceAccounts, images, queues … each "
        "tenant's jobs may name; default: nothing beyond the service's defaults (README: The service).")] = None,
    metrics_port: Annotated[int | None, typer.Option(
        help="Serve /metrics (tenant and job names in its labels) on this port of --host instead of the API's, "
        "so that a network policy can keep it for Prometheus.")] = None,
) -> None:
    """Run the sdray service: the REST job API (/docs), the job page (/) and Prometheus metrics (/metrics).

    Jobs survive a restart: they live in the SQLite store, and on start the service follows again what
    still runs and marks failed what the backend lost. One service process owns one store.
    """
    import uvicorn

    from sdray.service.app import Settings, create_app
    from sdray.service.auth import AuthFileError, load_tokens
    from sdray.service.backends import BackendError, make_backend
    from sdray.service.policy import Policy, PolicyError

    try:
        tenant_policy = Policy.load(policy)
        if not load_tokens(tokens).tokens:
            raise _fail(f"--tokens {tokens}: no tokens yet; create one with `sdray token create --tenant NAME "
                        f"--tokens {tokens}`", EXIT_BAD_INPUT)
        runner = make_backend(backend, ray_address=ray_address, data_dir=db.parent, num_cpus=num_cpus,
                              namespace=namespace)
    except (AuthFileError, BackendError, PolicyError) as exc:
        raise _fail(str(exc), EXIT_BAD_INPUT) from None
    url = public_url or f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
    api = create_app(Settings(tokens=tokens, db=db, public_url=url, poll_interval_s=poll_interval, policy=policy,
                              metrics_on_api=metrics_port is None), runner, policy=tenant_policy)
    if metrics_port is not None:
        from prometheus_client import start_http_server

        start_http_server(metrics_port, addr=host, registry=api.state.metrics.registry)
        err.print(f"metrics on http://{host}:{metrics_port}/metrics", highlight=False)
    err.print(f"sdray service on {url} (backend: {runner.name}, store: {db})", highlight=False)
    # Followed logs stream until their job ends: on SIGTERM, uvicorn cancels what is still open after 5 s
    # instead of waiting for those jobs.
    uvicorn.run(api, host=host, port=port, log_level="warning", access_log=False, timeout_graceful_shutdown=5)


ServerOption = Annotated[str | None, typer.Option("--server", help="Service URL (default: SDRAY_SERVER, the "
                                                  "config file, or http://127.0.0.1:8000).")]


def _client(server: str | None):
    from sdray.service.client import Client, ClientError

    try:
        return Client(server)
    except ClientError as exc:
        raise _fail(str(exc), EXIT_BAD_INPUT) from None


def _call(fn, *args):
    from sdray.service.client import ClientError

    try:
        return fn(*args)
    except ClientError as exc:
        if exc.errors:
            err.print(f"[bold red]error:[/] {exc}", highlight=False)
            for line in exc.errors:
                err.print(f"  - {line}", highlight=False, markup=False)
            raise typer.Exit(EXIT_BAD_INPUT) from None
        raise _fail(str(exc), EXIT_BAD_INPUT if exc.status in (400, 404, 413, 415, 422, 429) else EXIT_FAILED) from None


def _job_line(job: dict) -> str:
    step = f"{job['step']}/{job['max_steps']}" if job.get("step") is not None else "-"
    loss = f"{job['loss']:.4f}" if isinstance(job.get("loss"), float) else "-"
    return f"{job['id']}  {job['name']}  {job['state']}  step {step}  loss {loss}"


@app.command()
def submit(
    job: Annotated[Path, typer.Argument(help="Job document (YAML or JSON).")],
    server: ServerOption = None,
    wait: Annotated[bool, typer.Option(
        "--wait", help="Follow the job until it ends (a line on stderr at each change of state or step) and exit "
        "0 when it succeeded, 1 when it failed, 3 when it was cancelled or preempted.")] = False,
    timeout: Annotated[float | None, typer.Option(
        min=0, help="With --wait: give up after this many seconds (exit 4; the job goes on).")] = None,
    interval: Annotated[float, typer.Option(min=0.1, help="With --wait: seconds between looks at the job.")] = 2.0,
) -> None:
    """Submit a job document to the sdray service; prints the job id (and only that, on stdout)."""
    _load(job)  # the same check the server makes, before any network
    client = _client(server)
    created = _call(client.submit, job)
    err.print(f"submitted {created['name']} as job {created['id']} ({created['state']}): {created['links']['self']}",
              highlight=False)
    print(created["id"], flush=True)
    if wait:
        raise typer.Exit(_follow_job(client, created, timeout, interval))


def _follow_job(client, job: dict, timeout: float | None, interval: float) -> int:
    """Watch a job until it ends, a line on stderr whenever its state or step changes; the exit status its end
    means. A service that stops answering (a restart) is asked again for up to RECONNECT_S seconds."""
    from sdray.service.client import RECONNECT_S, ClientError
    from sdray.states import FINAL, JobState

    deadline = None if timeout is None else time.monotonic() + timeout
    shown, lost_since = None, None
    while True:
        line = _job_line(job)
        if line != shown:
            err.print(line, highlight=False, markup=False)
            shown = line
        if job["state"] in FINAL:
            break
        if deadline is not None and time.monotonic() >= deadline:
            err.print(f"sdray: job {job['id']} is still {job['state']} after {timeout:g} s; it goes on "
                      f"(`sdray cancel {job['id']}` stops it)", highlight=False, markup=False)
            return EXIT_TIMEOUT
        time.sleep(interval if deadline is None else max(0.0, min(interval, deadline - time.monotonic())))
        try:
            job = client.status(job["id"])
            lost_since = None
        except ClientError as exc:
            if exc.status is not None and exc.status < 500:
                raise _fail(str(exc), EXIT_BAD_INPUT if exc.status == 404 else EXIT_FAILED) from None
            lost_since = lost_since or time.monotonic()
            if time.monotonic() - lost_since > RECONNECT_S:
                raise _fail(f"{exc} (still unreachable after {RECONNECT_S:.0f} s)") from None
            err.print(f"sdray: {exc}; asking again", highlight=False, markup=False)
    failed = next((c for c in job.get("conditions") or [] if c.get("type") == "Failed"), None)
    if job["state"] == JobState.FAILED and failed:
        err.print(f"sdray: job {job['id']} failed: {failed['reason']}: {failed.get('message', '')}",
                  highlight=False, markup=False)
    return {JobState.SUCCEEDED: 0, JobState.FAILED: EXIT_FAILED}.get(job["state"], EXIT_CANCELLED)


@app.command()
def jobs(
    server: ServerOption = None,
    state: Annotated[list[str], typer.Option(
        help="Only jobs in this state (repeatable): Queued, Pending, Running, Succeeded, Failed, Cancelled, "
        "Preempted, in any case.")] = [],
    label: Annotated[list[str], typer.Option(help="Only jobs with this key=value label (repeatable).")] = [],
    output: OutputOption = Output.table,
) -> None:
    """List your jobs on the sdray service (filtered by the service)."""
    found = _call(_client(server).jobs, state, label)
    if output != Output.table:
        _emit({"jobs": found}, output)
        return
    table = Table(title=f"{len(found)} jobs", title_justify="left")
    for column in ("id", "name", "tenant", "state", "step", "loss", "images/s", "created"):
        table.add_column(column)
    for j in found:
        step = f"{j['step']}/{j['max_steps']}" if j.get("step") is not None else "-"
        table.add_row(j["id"], j["name"], j["tenant"], j["state"], step, _short(j.get("loss") or "-"),
                      _short(j.get("images_per_s") or "-"), j["created"])
    out.print(table)


@app.command()
def status(
    job_id: Annotated[str, typer.Argument(help="Job id (from `sdray submit` or `sdray jobs`).")],
    server: ServerOption = None,
    output: OutputOption = Output.table,
    as_json: Annotated[bool, typer.Option("--json", hidden=True, help="Same as --output json.")] = False,
) -> None:
    """Show one job: state, conditions, progress, last checkpoint, output (and trials of a search)."""
    job = _call(_client(server).status, job_id)
    if as_json or output != Output.table:
        _emit(job, Output.json if as_json else output)
        return
    out.print(_job_line(job), highlight=False)
    for c in job["conditions"]:
        out.print(f"  {c['type']}={c['status']}  {c['reason']}  {c['message']}  ({c['lastTransitionTime']})",
                  highlight=False, markup=False)
    for key in ("last_checkpoint", "output_uri", "images_per_s", "attempts"):
        if job.get(key) is not None:
            out.print(f"  {key}: {job[key]}", highlight=False, markup=False)
    for t in job.get("trials") or []:
        out.print(f"  trial {t.get('trial')}  {t.get('state')}  metric {t.get('metric')}  {t.get('params')}",
                  highlight=False, markup=False)


@app.command()
def logs(
    job_id: Annotated[str, typer.Argument(help="Job id.")],
    server: ServerOption = None,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing new lines until the job ends, "
                                         "across restarts of the service.")] = False,
    tail: Annotated[int | None, typer.Option(help="Only the last N lines.")] = None,
) -> None:
    """Print a job's driver log."""
    client = _client(server)
    if not follow:
        sys.stdout.write(_call(client.logs, job_id, tail))
        return
    from sdray.service.client import ClientError

    def reconnecting(why: str) -> None:
        err.print(f"sdray: {why}; reconnecting", highlight=False, markup=False)

    try:
        for chunk in client.follow_logs(job_id, tail, on_reconnect=reconnecting):
            sys.stdout.write(chunk)
            sys.stdout.flush()
    except ClientError as exc:
        raise _fail(str(exc), EXIT_BAD_INPUT if exc.status == 404 else EXIT_FAILED) from None


@app.command()
def cancel(
    job_id: Annotated[str, typer.Argument(help="Job id.")],
    server: ServerOption = None,
) -> None:
    """Cancel a job: its run stops and its checkpoints stay."""
    job = _call(_client(server).cancel, job_id)
    out.print(_job_line(job), highlight=False)


@app.command()
def demo(
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Folder for data, jobs, models and samples.")] = Path("demo-output"),
    family: Annotated[str, typer.Option(
        help="Model family: sd (tiny UNet, 8×8×4 latents), sd3 (tiny MMDiT) or flux (tiny Flux transformer; both "
        "on 8×8×16 latents), each trained with its tiny preset and judged the same way. sd3's and flux's outputs "
        "are named after the family (sd3-vae/, sd3-transformer/, sd3-digits-grid.png), beside sd's.")] = "sd",
    workers: Annotated[int, typer.Option(min=1, help="Ray Train workers.")] = 2,
    vae_steps: Annotated[int, typer.Option(min=1, help="Autoencoder-stage steps.")] = 600,
    denoiser_steps: Annotated[int | None, typer.Option(
        "--denoiser-steps", "--unet-steps", min=1,
        help="Denoiser-stage (UNet or transformer) steps; default: the family's recipe (sdray/demo.py).")] = None,
    per_digit: Annotated[int, typer.Option(min=1, help="Images drawn per digit for the judge.")] = 10,
) -> None:
    """Run the demo: train a tiny text-to-image model on handwritten digits and judge what it draws.

    Imports the digits, trains the autoencoder stage then the denoiser stage on local Ray workers, draws
    every digit with the exported pipeline and asks a classifier which digit each drawing shows. The
    last line printed is digit_accuracy=0.NN.
    """
    run.configure_logging()
    from sdray import demo as d
    from sdray.data.digits import import_digits as write
    from sdray.models.pipeline import generate, load_pipeline
    from sdray.train.reporting import image_grid

    if family not in d.RECIPES:
        raise _fail(f"--family: expected {', '.join(d.RECIPES)}, got {family!r}", EXIT_BAD_INPUT)
    start = time.perf_counter()
    out_dir = out_dir.absolute()
    n = write(str(out_dir / "digits"), "imagefolder", d.RESOLUTION)
    out.print(f"[1/4] wrote {n} digits to {out_dir / 'digits'}", highlight=False)
    vae_stage, denoiser_stage = d.stage_names(family)
    jobs = d.write_jobs(out_dir, d.demo_jobs(out_dir, family=family, workers=workers, vae_steps=vae_steps,
                                             denoiser_steps=denoiser_steps))
    out.print(f"[2/4] autoencoder stage ({jobs[vae_stage]})", highlight=False)
    _train(_load(jobs[vae_stage]))
    out.print(f"[3/4] denoiser stage ({jobs[denoiser_stage]})", highlight=False)
    summary = _train(_load(jobs[denoiser_stage]))
    out.print("[4/4] drawing every digit with the exported pipeline (stock diffusers) and judging", highlight=False)
    pipe = load_pipeline(summary["pipeline"])
    rows = generate(pipe, d.DIGIT_PROMPTS, images_per_prompt=per_digit, num_inference_steps=d.SAMPLING_STEPS,
                    guidance_scale=d.GUIDANCE_SCALE, seed=1234, resolution=d.RESOLUTION)
    accuracy, predictions = d.judge(rows)
    labels = [f"{p}  (read as: {''.join(map(str, pred))})" for p, pred in zip(d.DIGIT_PROMPTS, predictions)]
    grid_path = out_dir / d.grid_name(family)
    image_grid(rows, labels, cell=48).save(grid_path)
    out.print(f"grid: {grid_path}   loss curve: {out_dir / denoiser_stage / 'loss.png'}   "
              f"total {time.perf_counter() - start:.0f} s", highlight=False)
    print(f"digit_accuracy={accuracy:.2f}")


# -- Kubernetes: the CRD, rendering a document as a RayJob, the controller (sdray/k8s/) -------------------
k8s_app = typer.Typer(help="Kubernetes: the DiffusionJob CRD.", no_args_is_help=True)
app.add_typer(k8s_app, name="k8s")


@k8s_app.command("crd")
def k8s_crd() -> None:
    """Print the DiffusionJob CustomResourceDefinition (generated from the job model) as YAML."""
    from sdray.k8s.crd import crd_yaml

    sys.stdout.write(crd_yaml())


def _render_settings(image: str | None, job_service_account: str | None, pod_defaults: Path | None = None,
                     **allowed: list[str] | None):
    """RenderSettings from the options; ``allowed``: allowed_service_accounts, allowed_volume_claims,
    allowed_config_maps (None: any)."""
    from sdray.k8s.defaults import PodDefaults, PodDefaultsError
    from sdray.k8s.render import RenderSettings

    given = {"image": image, "job_service_account": job_service_account,
             **{k: tuple(v) if v is not None else None for k, v in allowed.items()}}
    if pod_defaults is not None:
        try:
            given["pods"] = PodDefaults.load(pod_defaults)
        except PodDefaultsError as exc:
            raise _fail(str(exc), EXIT_BAD_INPUT) from None
    return RenderSettings(**{k: v for k, v in given.items() if v is not None and v != ""})


_POD_DEFAULTS_HELP = ("The platform's defaults for every job's pods (YAML; the chart's jobPods values: image pull "
                      "secrets, labels, annotations, affinity, topology spread, volumes, acceleratorResource, "
                      "runtimeClassName, schedulerName, priorityClassName, serviceAccountAnnotations).")


@app.command()
def render(
    job: Annotated[Path, typer.Argument(help="Job document (YAML or JSON).")],
    namespace: Annotated[str | None, typer.Option("--namespace", "-n", help="Namespace; default: the document's.")] = None,
    image: Annotated[str | None, typer.Option(envvar="SDRAY_IMAGE", help="Image of the Ray pods (unless "
                                              "spec.cluster.image).")] = None,
    job_service_account: Annotated[str | None, typer.Option(
        envvar="SDRAY_JOB_SERVICE_ACCOUNT", help="ServiceAccount of the Ray pods (unless spec.cluster.service_account).")] = None,
    pod_defaults: Annotated[Path | None, typer.Option(envvar="SDRAY_POD_DEFAULTS", help=_POD_DEFAULTS_HELP)] = None,
) -> None:
    """Print the ConfigMap and KubeRay RayJob the controller makes of a document (YAML, for kubectl apply -f -)."""
    from sdray.k8s.render import RenderError, render as render_objects, render_yaml

    doc = _load(job)
    settings = _render_settings(image, job_service_account, pod_defaults)
    try:
        objects = render_objects(doc, settings, namespace=namespace)
    except RenderError as exc:
        raise _fail(f"{job}: {exc}", EXIT_BAD_INPUT) from None
    sys.stdout.write(render_yaml(objects))


@app.command()
def controller(
    namespace: Annotated[list[str] | None, typer.Option(
        "--namespace", "-n", help="Namespace to watch; repeat for several; none: every namespace.")] = None,
    lease_namespace: Annotated[str | None, typer.Option(
        envvar="POD_NAMESPACE", help="Namespace of the leader-election Lease; default: the first --namespace.")] = None,
    lease_name: Annotated[str, typer.Option(help="Name of the Lease (one per installation).")] = "sdray-controller",
    image: Annotated[str | None, typer.Option(envvar="SDRAY_IMAGE", help="Image of the Ray pods.")] = None,
    job_service_account: Annotated[str | None, typer.Option(
        envvar="SDRAY_JOB_SERVICE_ACCOUNT", help="ServiceAccount of the Ray pods (lets the driver report progress).")] = None,
    kubeconfig: Annotated[Path | None, typer.Option(help="Kubeconfig; default: in-cluster, else ~/.kube/config.")] = None,
    health_port: Annotated[int, typer.Option(help="Port of /healthz, /readyz and /metrics; 0: none.")] = 8081,
    allow_service_account: Annotated[list[str] | None, typer.Option(
        help="A ServiceAccount that documents may name in spec.cluster.service_account (e.g. one bound to an S3 "
        "role); repeat for several. None given: documents may name none (each job runs as its own).")] = None,
    allow_volume_claim: Annotated[list[str] | None, typer.Option(
        help="A PersistentVolumeClaim that documents may mount (spec.cluster.volumes); repeat for several. None "
        "given: none.")] = None,
    allow_config_map: Annotated[list[str] | None, typer.Option(
        help="A ConfigMap that documents may mount (spec.cluster.volumes); repeat for several. None given: "
        "none.")] = None,
    pod_defaults: Annotated[Path | None, typer.Option(envvar="SDRAY_POD_DEFAULTS", help=_POD_DEFAULTS_HELP)] = None,
) -> None:
    """Run the DiffusionJob controller: each DiffusionJob becomes a KubeRay RayJob, whose progress is mirrored
    into the DiffusionJob's status. Replicas elect a leader through a Lease; only the leader acts."""
    import signal

    from sdray.k8s.controller import Controller, ControllerConfig, serve_health
    from sdray.k8s.kube import Clients

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    lease_ns = lease_namespace or (namespace[0] if namespace else "default")
    config = ControllerConfig(namespaces=namespace or None, lease_namespace=lease_ns, lease_name=lease_name,
                              render=_render_settings(image, job_service_account, pod_defaults,
                                                      allowed_service_accounts=allow_service_account or [],
                                                      allowed_volume_claims=allow_volume_claim or [],
                                                      allowed_config_maps=allow_config_map or []))
    try:
        clients = Clients.connect(kubeconfig=str(kubeconfig) if kubeconfig else None, user_agent="sdray-controller")
    except Exception as exc:
        raise _fail(f"cannot reach the Kubernetes API: {exc}") from None
    ctl = Controller(clients, config)
    # Kubernetes stops a pod with SIGTERM: give the Lease up at once, so that another replica takes over.
    signal.signal(signal.SIGTERM, lambda *_: ctl.request_stop())
    if health_port:
        serve_health(ctl, health_port)
    err.print(f"sdray controller {config.identity}: watching {', '.join(namespace or ['every namespace'])}; "
              f"lease {lease_ns}/{config.lease_name}", highlight=False)
    ctl.run_forever()


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
