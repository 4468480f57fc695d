"""Hyperparameter search (spec.tune): real Ray Tune over real Ray Train runs of the tiny preset."""

import json
import math

import pyarrow.parquet as pq
import pytest
import yaml
from conftest import kill_tree, make_job, start_cli, wait_for
from diffusers import StableDiffusionPipeline

from sdray.spec import SpecError, parse_job
from sdray.tuning import TuneError, apply_params, run_search


def tune_job(name, tmp_path, data_uri, tune, **spec):
    sections = dict(
        data={"validation_fraction": 0.1},
        train={"max_steps": 30, "batch_size": 16, "learning_rate": 1e-3, "log_every_n_steps": 10},
        checkpoint={"every_n_steps": 10, "keep_last": 2},
        validation={"max_batches": 2},
    )
    sections.update(spec)
    doc = make_job(name, tmp_path / "out", data_uri, **sections)
    doc["spec"]["tune"] = tune
    return doc


def test_search_spaces_are_checked_against_the_spec(tmp_path):
    def errors(space, **tune):
        doc = tune_job("bad", tmp_path, "unused", {"search_space": space, **tune})
        with pytest.raises(SpecError) as exc:
            parse_job(doc)
        return exc.value.errors

    assert errors({"train.learnin_rate": {"loguniform": [1e-4, 1e-2]}}) == [
        "spec.tune.search_space.train.learnin_rate: not a tunable field of the job spec (give a dotted path such "
        "as train.learning_rate or train.batch_size)"]
    assert "choice or grid" in errors({"train.lr_scheduler": {"uniform": [0, 1]}})[0]
    assert "integer field" in errors({"train.batch_size": {"loguniform": [1, 64]}})[0]
    assert errors({"train.batch_size": {"choice": [8, 0]}})[0].startswith(
        "spec.tune.search_space.train.batch_size: the value 0 is refused: train.batch_size: Input should be greater than 0")
    assert "low must be > 0" in " ".join(errors({"train.learning_rate": {"loguniform": [0, 1]}}))
    assert "exactly one of" in " ".join(errors({"train.learning_rate": {"uniform": [0.1, 1], "choice": [1]}}))
    assert "multiple of checkpoint.every_n_steps" in " ".join(
        errors({"train.learning_rate": {"choice": [1e-3]}}, scheduler={"name": "asha", "grace_period": 15}))
    assert "pbt perturbs values" in " ".join(
        errors({"train.learning_rate": {"grid": [1e-3, 1e-2]}}, scheduler={"name": "pbt"}))
    assert "applies to scheduler asha only" in " ".join(
        errors({"train.learning_rate": {"choice": [1e-3]}}, scheduler={"name": "pbt", "grace_period": 10}))
    doc = tune_job("noval", tmp_path, "unused", {"search_space": {"train.learning_rate": {"choice": [1e-3]}}},
                   data={"validation_fraction": 0.0})
    with pytest.raises(SpecError, match="spec.tune.metric: val_loss needs a held-out split"):
        parse_job(doc)


def test_lr_scales_with_the_sampled_global_batch(tmp_path):
    doc = tune_job("scale", tmp_path, "unused", {"search_space": {"train.batch_size": {"choice": [16, 64]}},
                                                 "scale_lr_with_batch": "sqrt"})
    job = parse_job(doc)
    assert apply_params(job, {"train.batch_size": 64})["spec"]["train"]["learning_rate"] == pytest.approx(2e-3)
    doc["spec"]["tune"]["scale_lr_with_batch"] = "linear"
    trial = apply_params(parse_job(doc), {"train.batch_size": 64, "train.learning_rate": 1e-4})
    assert trial["spec"]["train"] == {**trial["spec"]["train"], "batch_size": 64, "learning_rate": pytest.approx(4e-4)}
    assert "tune" not in trial["spec"]


def test_optuna_is_named_when_it_is_missing(tmp_path):
    pytest.importorskip("ray.tune")
    try:
        import optuna  # noqa: F401
        pytest.skip("optuna is installed here")
    except ImportError:
        pass
    doc = tune_job("optuna", tmp_path, "unused", {"search_space": {"train.learning_rate": {"choice": [1e-3]}},
                                                  "search_alg": "optuna"})
    with pytest.raises(TuneError, match="spec.tune.search_alg: optuna is not installed"):
        run_search(parse_job(doc))


@pytest.mark.slow  # a 4-trial ASHA search (~260 s); test_resume_if_exists_… keeps a search in the default suite
def test_asha_search_ranks_a_diverging_rate_last_and_exports_the_best(ray_session, digits_root, tmp_path):
    # batch 512 is more than the 360 training images hold: those trials fail, and the search goes on
    doc = tune_job("asha", tmp_path, str(digits_root / "imagefolder"), {
        "search_space": {"train.learning_rate": {"grid": [2e-3, 1e3]}, "train.batch_size": {"grid": [8, 512]}},
        "scheduler": {"name": "asha", "grace_period": 10, "reduction_factor": 2},
        "max_concurrent_trials": 2,
    }, distributed={"num_workers": 1, "max_failures": 0})
    summary = run_search(parse_job(doc), resume="auto")  # as a RayJob runs it: no search yet, so a new one
    trials = summary["trials"]
    assert len(trials) == 4
    failed = [t for t in trials if t["status"] == "failed"]
    assert [t["params"]["train.batch_size"] for t in failed] == [512, 512]
    assert all("no full batch" in t["error"] for t in failed), failed
    absurd, sane = [[t for t in trials if t["params"] == {"train.learning_rate": lr, "train.batch_size": 8}]
                    for lr in (1e3, 2e-3)]
    # the diverging rate is stopped early or ranked below the sane trial
    assert absurd[0]["status"] == "stopped early" or absurd[0]["metric"] > sane[0]["metric"], absurd
    assert summary["best"]["params"] == {"train.learning_rate": 2e-3, "train.batch_size": 8}
    out = tmp_path / "out"
    table = pq.read_table(out / "results.parquet").to_pylist()
    assert len(table) == 4 and sorted(r["status"] for r in table).count("failed") == 2
    assert (out / "tune.png").stat().st_size > 1000
    best = yaml.safe_load((out / "best.yaml").read_text())
    assert "tune" not in best["spec"]
    assert best["spec"]["train"]["learning_rate"] == 2e-3
    assert best["spec"]["train"]["batch_size"] == 8
    parse_job(best)  # ready to run
    pipe = StableDiffusionPipeline.from_pretrained(out / "pipeline")
    assert pipe("a handwritten digit 1", num_inference_steps=2).images[0].size == (16, 16)


@pytest.mark.slow  # ~90 s; the default run keeps the ASHA search (test-time budget)
def test_pbt_trials_copy_a_stronger_trial_and_perturb_its_rate(ray_session, digits_root, tmp_path):
    doc = tune_job("pbt", tmp_path, str(digits_root / "imagefolder"), {
        "search_space": {"train.learning_rate": {"loguniform": [1e-5, 1e-1]}},
        "num_samples": 2, "seed": 3, "max_concurrent_trials": 2,
        "scheduler": {"name": "pbt", "perturbation_interval": 10, "quantile_fraction": 0.5,
                      "resample_probability": 0.0},
    }, train={"max_steps": 20, "batch_size": 16, "learning_rate": 1e-3, "log_every_n_steps": 10})
    summary = run_search(parse_job(doc))
    trials = {t["trial"]: t for t in summary["trials"]}
    assert len(trials) == 2 and all(t["status"] == "finished" for t in trials.values()), trials
    copied = [t for t in trials.values() if t["copied_from"]]
    assert copied and all(t["copied_from"] in trials and t["copied_from"] != t["trial"] for t in copied), trials
    # Tune's own log of each exploit: [target, clone, target step, clone step, clone's config, new config]
    log = tmp_path / "out" / "checkpoints" / "pbt-tune" / "pbt_global.txt"
    exploits = [json.loads(line) for line in log.read_text().splitlines()]
    assert exploits
    for _, _, _, _, old, new in exploits:  # explore: the copied rate times 0.8 or 1.2 (no resampling)
        ratio = new["train.learning_rate"] / old["train.learning_rate"]
        assert any(math.isclose(ratio, f, rel_tol=1e-6) for f in (0.8, 1.2)), (old, new)
    assert (tmp_path / "out" / "pipeline" / "model_index.json").exists()


def test_resume_if_exists_restores_only_the_search_the_same_spec_started(tmp_path):
    from sdray import storage
    from sdray.tuning import SEARCH_FILE, _same_search, experiment_uri, search_fingerprint

    space = {"search_space": {"train.learning_rate": {"grid": [1e-3, 3e-3]}}}
    job = parse_job(tune_job("again", tmp_path, "unused", space))
    assert not _same_search(job)  # nothing stored: a new search
    storage.write_bytes(storage.join(experiment_uri(job), SEARCH_FILE),
                        json.dumps({"fingerprint": search_fingerprint(job)}).encode())
    assert _same_search(parse_job(tune_job("again", tmp_path, "unused", space)))  # a retry of the same document
    other = tune_job("again", tmp_path, "unused", {"search_space": {"train.learning_rate": {"grid": [1e-2]}}})
    assert not _same_search(parse_job(other))  # the same name, another search: it starts afresh
    longer = tune_job("again", tmp_path, "unused", space, train={"max_steps": 60})
    assert not _same_search(parse_job(longer))


@pytest.mark.slow  # ~2 min: two searches and a kill (test-time budget)
def test_interrupted_search_resumes_without_rerunning_finished_trials(ray_session, digits_root, tmp_path):
    doc = tune_job("resumed", tmp_path, str(digits_root / "imagefolder"), {
        "search_space": {"train.learning_rate": {"grid": [1e-3, 3e-3]}}, "max_concurrent_trials": 1,
    })
    trials_dir = tmp_path / "out" / "trials"
    proc = start_cli("tune", doc, tmp_path / "job.yaml")
    train_runs = tmp_path / "out" / "checkpoints" / "resumed-tune" / "train"

    def second_trial_checkpointed():
        done = list(trials_dir.glob("*/summary.json"))
        snapshots = list(train_runs.glob("*/checkpoint_manager_snapshot.json"))
        return len(done) == 1 and len(snapshots) >= 2

    try:
        wait_for(second_trial_checkpointed, 600, "one finished trial and a checkpoint of the next", proc)
    finally:
        kill_tree(proc)
    finished = next(trials_dir.glob("*/summary.json"))
    stamp = finished.stat().st_mtime_ns
    assert len(list(trials_dir.glob("*/summary.json"))) == 1

    # as a retried RayJob or service job runs it (`--resume-if-exists`): the search exists, so it continues
    summary = run_search(parse_job(doc), resume="auto")
    assert len(summary["trials"]) == 2 and all(t["status"] == "finished" for t in summary["trials"])
    assert finished.stat().st_mtime_ns == stamp  # the finished trial was not run again
    assert len(list(trials_dir.glob("*/summary.json"))) == 2
    assert (tmp_path / "out" / "best.yaml").exists()
