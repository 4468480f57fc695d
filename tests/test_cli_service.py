"""The CLI as scripts use it, through typer's runner against a real `sdray serve` (dry-run backend, real HTTP):
--version, shell completion, --output json|yaml of validate/jobs/status (only that on stdout), jobs filtered by
state and label on the server, and submit --wait with its exit codes."""

from __future__ import annotations

import json
import threading

import pytest
import yaml
from typer.testing import CliRunner

from conftest import make_job, wait_for
from service_helpers import ThreadedService, tokens  # noqa: F401
from sdray.cli import EXIT_BAD_INPUT, EXIT_CANCELLED, EXIT_FAILED, EXIT_TIMEOUT, app
from sdray.service.backends.dryrun import DryRunBackend

runner = CliRunner()


@pytest.fixture
def service(tmp_path, tokens, monkeypatch):
    svc = ThreadedService(tmp_path, DryRunBackend(hold=True), tokens[0])
    monkeypatch.setenv("SDRAY_TOKEN", tokens[1]["alice"])
    monkeypatch.setenv("SDRAY_CONFIG", str(tmp_path / "none.yaml"))
    monkeypatch.setenv("SDRAY_SERVER", svc.url)
    yield svc
    svc.stop()


def write_job(tmp_path, name, **spec):
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(make_job(name, tmp_path / "out" / name, str(tmp_path / "data"), **spec)))
    return path


def test_version_comes_from_the_package_metadata():
    from importlib.metadata import version

    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.stdout == f"sdray {version('sdray')}\n"


def test_shell_completion_is_typers_and_completes_commands(monkeypatch):
    help_text = runner.invoke(app, ["--help"]).stdout
    assert "--install-completion" in help_text and "--show-completion" in help_text
    monkeypatch.setenv("_TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION", "1")  # so that the shell is an argument
    script = runner.invoke(app, ["--show-completion", "bash"], prog_name="sdray")
    assert script.exit_code == 0
    assert "_SDRAY_COMPLETE=complete_bash" in script.stdout and "complete -o default -F" in script.stdout
    # what that script asks: the words so far, answered by the same program
    done = runner.invoke(app, [], prog_name="sdray",
                         env={"_SDRAY_COMPLETE": "complete_bash", "COMP_WORDS": "sdray jo", "COMP_CWORD": "1"})
    assert done.stdout.split() == ["jobs"]


def test_validate_prints_json_or_yaml_only(tmp_path):
    ok = write_job(tmp_path, "checked", tune={"search_space": {"train.learning_rate": {"loguniform": [1e-5, 1e-3]}},
                                              "scheduler": "asha", "metric": "loss"})
    result = runner.invoke(app, ["validate", str(ok), "--output", "json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {
        "valid": True, "name": "checked", "namespace": None, "kind": "tune", "stage": "denoiser", "family": "sd",
        "model": "tiny", "data": {"uri": str(tmp_path / "data"), "format": "imagefolder"}, "steps": 20,
        "batch_size": 16, "workers": 1, "strategy": "ddp", "output": str(tmp_path / "out" / "checked")}
    assert yaml.safe_load(runner.invoke(app, ["validate", str(ok), "-o", "yaml"]).stdout)["kind"] == "tune"
    bad = write_job(tmp_path, "bad", train={"learning_rate": -1})
    refused = runner.invoke(app, ["validate", str(bad), "-o", "json"])
    assert refused.exit_code == EXIT_BAD_INPUT
    assert json.loads(refused.stdout) == {"valid": False, "source": str(bad), "errors": [
        "spec.train.learning_rate: Input should be greater than 0 (got -1)"]}
    assert "spec.train.learning_rate" in refused.stderr  # and for people, on stderr
    wrong = runner.invoke(app, ["validate", str(ok), "-o", "xml"])
    said = " ".join(wrong.stderr.replace("│", " ").split())  # (rich draws the message in a box)
    assert wrong.exit_code == 2 and "--output' / '-o': Value error, 'xml' is not one of 'table', 'json', 'yaml'" in said


def test_jobs_are_filtered_by_state_and_label_on_the_server(service, tmp_path):
    ids = {}
    for name, team in (("red-1", "red"), ("blue-1", "blue"), ("red-2", "red")):
        path = write_job(tmp_path, name)
        doc = yaml.safe_load(path.read_text())
        doc["metadata"]["labels"] = {"team": team}
        path.write_text(yaml.safe_dump(doc))
        result = runner.invoke(app, ["submit", str(path)])
        assert result.exit_code == 0, result.output
        ids[name] = result.stdout.strip()  # the id, and nothing else, on stdout
    assert runner.invoke(app, ["cancel", ids["red-2"]]).exit_code == 0
    cancelled = json.loads(runner.invoke(app, ["jobs", "--state", "Cancelled", "-o", "json"]).stdout)["jobs"]
    assert [j["id"] for j in cancelled] == [ids["red-2"]] and cancelled[0]["state"] == "Cancelled"
    red = yaml.safe_load(runner.invoke(app, ["jobs", "--label", "team=red", "--output", "yaml"]).stdout)["jobs"]
    assert [j["name"] for j in red] == ["red-1", "red-2"]
    both = json.loads(runner.invoke(app, ["jobs", "--label", "team=red", "--state", "cancelled", "-o", "json"]).stdout)
    assert [j["name"] for j in both["jobs"]] == ["red-2"]  # the state as it was written before: any case
    table = runner.invoke(app, ["jobs", "--state", "Cancelled"])
    assert "red-2" in table.stdout and "red-1" not in table.stdout
    bogus = runner.invoke(app, ["jobs", "--state", "done"])
    assert bogus.exit_code == EXIT_BAD_INPUT
    assert "query.state.0: Input should be 'Queued', 'Pending', 'Running', 'Succeeded', 'Failed'" in bogus.stderr
    shown = runner.invoke(app, ["status", ids["blue-1"], "-o", "yaml"])
    assert yaml.safe_load(shown.stdout)["labels"] == {"team": "blue"}
    assert json.loads(runner.invoke(app, ["status", ids["blue-1"], "--json"]).stdout)["name"] == "blue-1"


def _submit_in_thread(args):
    box = {}
    thread = threading.Thread(target=lambda: box.setdefault("result", runner.invoke(app, args)), daemon=True)
    thread.start()
    return thread, box


@pytest.mark.parametrize("end, code", [("Succeeded", 0), ("Failed", EXIT_FAILED), ("Cancelled", EXIT_CANCELLED),
                                       ("Preempted", EXIT_CANCELLED)])
def test_submit_wait_follows_the_job_and_exits_by_how_it_ended(service, tmp_path, end, code):
    path = write_job(tmp_path, "followed")
    thread, box = _submit_in_thread(["submit", str(path), "--wait", "--interval", "0.2"])
    job = wait_for(lambda: [j for j in service.manager.store.list(states=["Running"])], 30, "the job to run")[0]
    service.backend.finish(job.handle, end)
    thread.join(timeout=60)
    assert not thread.is_alive(), "submit --wait returns once the job ended"
    result = box["result"]
    assert result.exit_code == code, result.output
    assert result.stdout.strip() == job.id  # stdout: the id only; the progress lines are on stderr
    states = [line.split()[2] for line in result.stderr.splitlines() if line.startswith(job.id)]
    # (Running may come and go between two polls: the job is ended as soon as the store says it runs)
    assert states[0] in ("Queued", "Pending", "Running") and states[-1] == end and len(states) >= 2


def test_submit_wait_gives_up_after_its_timeout_and_the_job_goes_on(service, tmp_path):
    result = runner.invoke(app, ["submit", str(write_job(tmp_path, "slow")), "--wait", "--timeout", "1",
                                 "--interval", "0.2"])
    assert result.exit_code == EXIT_TIMEOUT, result.output
    job_id = result.stdout.strip()
    assert f"job {job_id} is still" in result.stderr and "it goes on" in result.stderr
    assert service.manager.store.get(job_id).state in ("Queued", "Pending", "Running")
