import copy
import json
import re

import pytest
import yaml
from conftest import make_job

from sdray.spec import (MAX_DOCUMENT_BYTES, SpecError, json_schema, load_job, parse_document_text, parse_job,
                        quantity_value)


def valid_doc():
    return make_job("spec-test", "/tmp/out", "s3://bucket/digits")


def test_valid_document_parses_with_defaults():
    job = parse_job(valid_doc())
    assert job.metadata.name == "spec-test"
    assert job.spec.stage == "denoiser"
    assert job.spec.train.lr_scheduler == "constant"
    assert job.spec.distributed.strategy == "ddp"
    assert job.spec.checkpoint.resume == "auto"
    assert job.spec.checkpoint_uri == "/tmp/out/checkpoints"


def _set(doc, path, value):
    node = doc
    *parents, last = path.split(".")
    for p in parents:
        node = node.setdefault(p, {})
    node[last] = value
    return doc


@pytest.mark.parametrize(
    "path, value, expected",
    [
        ("spec.train.learning_rate", -1, "spec.train.learning_rate: Input should be greater than 0"),
        ("spec.train.learning_rat", 0.1, "spec.train.learning_rat: unknown field"),
        ("spec.train.mixed_precision", "fp8", "spec.train.mixed_precision"),
        ("spec.distributed.strategy", "horovod", "spec.distributed.strategy: Input should be 'ddp', 'fsdp' or"),
        ("spec.distributed.deepspeed.zero_stage", 4, "spec.distributed.deepspeed.zero_stage: Input should be 1, 2 or 3"),
        ("spec.distributed.deepspeed.offload_optimizer", "cpu", "spec.distributed.deepspeed.offload_optimizer"),
        ("spec.distributed.num_workers", 0, "spec.distributed.num_workers"),
        ("spec.data.format", "csv", "spec.data.format"),
        ("spec.data.crop", "left", "spec.data.crop"),
        ("spec.data.aws_secret_access_key", "S", "spec.data.aws_secret_access_key: unknown field"),
        ("spec.model.resolution", 20, "multiple of 8"),
        ("spec.model.prediction_type", "sample", "spec.model.prediction_type"),
        ("spec.checkpoint.keep_last", 0, "spec.checkpoint.keep_last"),
        ("spec.stage", "vae", "spec.stage"),
        ("spec.train.optimizer.betas", [0.9, 1.5], "spec.train.optimizer.betas"),
        ("apiVersion", "sdray.io/v2", "apiVersion"),
        ("kind", "Job", "kind"),
        ("metadata.name", "Bad_Name", "metadata.name"),
    ],
)
def test_invalid_field_is_named(path, value, expected):
    doc = _set(copy.deepcopy(valid_doc()), path, value)
    with pytest.raises(SpecError) as err:
        parse_job(doc)
    assert any(expected in line for line in err.value.errors), err.value.errors


def test_missing_sections_are_named():
    doc = valid_doc()
    del doc["spec"]["data"]
    del doc["spec"]["output"]
    with pytest.raises(SpecError) as err:
        parse_job(doc)
    assert "spec.data: required field is missing" in err.value.errors
    assert "spec.output: required field is missing" in err.value.errors


@pytest.mark.parametrize("stage, section, field, value", [
    ("autoencoder", "train", "caption_dropout", 0.2),
    ("autoencoder", "validation", "prompts", ["a digit"]),
    ("autoencoder", "model", "prediction_type", "v_prediction"),
    ("unet", "train", "kl_weight", 1e-4),
])
def test_settings_of_the_other_stage_are_refused(stage, section, field, value):
    doc = valid_doc()
    doc["spec"]["stage"] = stage
    doc["spec"].setdefault(section, {})[field] = value
    with pytest.raises(SpecError) as err:
        parse_job(doc)
    assert f"spec.{section}.{field} applies to stage" in str(err.value)


@pytest.mark.parametrize("preset", ["tiny", "tiny-xl", "sd15", "sd2-base", "sdxl-base"])
def test_every_preset_is_accepted(preset):
    doc = valid_doc()
    doc["spec"]["model"]["preset"] = preset
    assert parse_job(doc).spec.model.preset == preset


@pytest.mark.parametrize("distributed, train, expected", [
    ({"strategy": "ddp", "fsdp": {"sharding": "full"}}, {}, "spec.distributed.fsdp applies to strategy: fsdp only"),
    ({"strategy": "fsdp", "fsdp": {"cpu_offload": True}}, {}, "cpu_offload .* needs use_gpu: true"),
    ({"strategy": "fsdp", "num_workers": 4, "fsdp": {"sharding": "hybrid"}}, {}, "shard_group_size: sharding: hybrid"),
    ({"strategy": "fsdp", "num_workers": 4, "fsdp": {"sharding": "hybrid", "shard_group_size": 3}}, {},
     "divides num_workers"),
    ({"strategy": "fsdp", "fsdp": {"shard_group_size": 2}}, {}, "applies to sharding: hybrid only"),
    ({"strategy": "fsdp"}, {"mixed_precision": "fp16"}, "spec.train.mixed_precision: fp16 needs a sharded loss scaler"),
    ({"strategy": "ddp", "deepspeed": {"zero_stage": 2}}, {},
     "spec.distributed.deepspeed applies to strategy: deepspeed only"),
    ({"strategy": "deepspeed", "deepspeed": {"offload_params": True}}, {},
     "spec.distributed.deepspeed.offload_params: .* needs zero_stage: 3 \\(got 2\\)"),
    ({"strategy": "deepspeed"}, {"compile": True}, "spec.train.compile is not supported with strategy: deepspeed"),
    ({"strategy": "deepspeed", "deepspeed": {"zero_stage": 3}}, {"ema": {"decay": 0.99}},
     "spec.train.ema: ZeRO-3 partitions the weights"),
])
def test_strategy_settings_are_checked(distributed, train, expected):
    doc = valid_doc()
    doc["spec"]["distributed"] = distributed
    doc["spec"]["train"].update(train)
    with pytest.raises(SpecError, match=expected):
        parse_job(doc)


def test_fsdp_settings_accepted():
    doc = valid_doc()
    doc["spec"]["distributed"] = {"strategy": "fsdp", "num_workers": 8, "use_gpu": True,
                                  "fsdp": {"sharding": "hybrid", "shard_group_size": 4, "cpu_offload": True}}
    doc["spec"]["train"]["mixed_precision"] = "bf16"
    assert parse_job(doc).spec.distributed.fsdp.shard_group_size == 4


def test_deepspeed_settings_accepted():
    doc = valid_doc()
    doc["spec"]["distributed"] = {"strategy": "deepspeed", "num_workers": 2,
                                  "deepspeed": {"zero_stage": 3, "offload_optimizer": True, "offload_params": True}}
    doc["spec"]["train"]["mixed_precision"] = "fp16"
    assert parse_job(doc).spec.distributed.deepspeed.offload_params
    doc["spec"]["distributed"] = {"strategy": "deepspeed"}
    assert parse_job(doc).spec.distributed.deepspeed is None  # zero_stage 2 by default


def test_model_needs_preset_or_pretrained():
    doc = valid_doc()
    doc["spec"]["model"] = {"prediction_type": "epsilon"}
    with pytest.raises(SpecError, match="spec.model.preset"):
        parse_job(doc)


def test_load_job_yaml_and_json(tmp_path):
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(valid_doc()))
    (tmp_path / "job.json").write_text(json.dumps(valid_doc()))
    assert load_job(tmp_path / "job.yaml") == load_job(tmp_path / "job.json")


def test_load_job_names_the_file_on_bad_yaml(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("spec: [unclosed")
    with pytest.raises(SpecError) as err:
        load_job(bad)
    assert str(bad) in str(err.value) and "not valid YAML" in str(err.value)
    with pytest.raises(SpecError, match="cannot read"):
        load_job(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(SpecError, match="expected a mapping"):
        load_job(tmp_path / "list.yaml")


def test_schema_is_strict_and_complete():
    schema = json_schema()
    assert set(schema["required"]) == {"apiVersion", "kind", "metadata", "spec"}
    job_spec = schema["$defs"]["JobSpec"]
    assert {"stage", "model", "data", "train", "distributed", "checkpoint", "validation", "output"} <= set(
        job_spec["properties"])
    assert all(d.get("additionalProperties") is False for d in schema["$defs"].values() if d.get("type") == "object")


def test_data_s3_settings_fall_back_to_storage():
    doc = valid_doc()
    doc["spec"]["storage"] = {"endpoint": "http://127.0.0.1:9000", "region": "eu-west-1"}
    doc["spec"]["data"]["region"] = "us-east-2"
    s3 = parse_job(doc).spec.data_s3
    assert s3.endpoint == "http://127.0.0.1:9000" and s3.region == "us-east-2"


def test_a_job_survives_the_trip_to_the_workers():
    """Workers re-validate the document they are sent: it must mean the same there."""
    for stage in ("unet", "autoencoder"):
        doc = valid_doc()
        doc["spec"]["stage"] = stage
        doc["spec"]["distributed"] = {"strategy": "deepspeed", "deepspeed": {"zero_stage": 3}}
        job = parse_job(doc)
        assert parse_job(job.model_dump(mode="json", exclude_unset=True)) == job


def lora_doc(**lora):
    doc = valid_doc()
    doc["spec"]["model"] = {"pretrained": "s3://models/base", "lora": {"rank": 4, **lora}}
    return doc


def test_lora_defaults_and_trip_to_the_workers():
    job = parse_job(lora_doc())
    lora = job.spec.model.lora
    assert (lora.alpha, lora.targets, lora.dropout) == (4.0, None, 0.0)  # targets: the family's
    assert parse_job(job.model_dump(mode="json", exclude_unset=True)) == job
    assert parse_job(lora_doc(alpha=8)).spec.model.lora.alpha == 8.0


@pytest.mark.parametrize("change, expected", [
    (lambda d: d["spec"]["model"].update(pretrained=None, preset="tiny"),
     "spec.model.lora adapts pretrained weights: set spec.model.pretrained"),
    (lambda d: d["spec"]["model"]["lora"].update(rank=0), "spec.model.lora.rank: Input should be greater than 0"),
    (lambda d: d["spec"]["model"]["lora"].update(targets=[]), "spec.model.lora.targets"),
    (lambda d: d["spec"].update(stage="autoencoder"), "spec.model.lora applies to stage: denoiser only"),
    (lambda d: d["spec"].update(distributed={"num_workers": 2, "strategy": "fsdp"}),
     "spec.model.lora is not available with strategy: fsdp"),
])
def test_lora_refusals_name_the_field(change, expected):
    doc = lora_doc()
    change(doc)
    with pytest.raises(SpecError) as err:
        parse_job(doc)
    assert any(expected in line for line in err.value.errors), err.value.errors


@pytest.mark.parametrize("spec, expected", [
    ({"stage": "autoencoder"}, "spec.train.train_text_encoder applies to stage: denoiser only"),
    ({"distributed": {"num_workers": 2, "strategy": "fsdp"}}, "spec.train.train_text_encoder is not available with "
                                                              "strategy: fsdp"),
])
def test_train_text_encoder_refusals_name_the_field(spec, expected):
    doc = valid_doc()
    doc["spec"]["train"]["train_text_encoder"] = True
    doc["spec"].update(spec)
    with pytest.raises(SpecError, match=expected):
        parse_job(doc)


@pytest.mark.parametrize("cluster, distributed, expected", [
    ({"queue": "Team_A"}, {}, "spec.cluster.queue: String should match pattern"),
    ({"worker": {"memory": "32GB"}}, {}, "spec.cluster.worker.memory: expected a Kubernetes quantity"),
    ({"worker": {"gpu": -1}}, {}, "spec.cluster.worker.gpu: Input should be greater than or equal to 0"),
    ({"worker": {"gpu": 1}}, {}, "spec.cluster.worker.gpu: the workers use no GPU"),
    ({"worker": {"gpu": 1}}, {"use_gpu": True, "num_workers": 2, "resources_per_worker": {"GPU": 2}},
     r"spec.cluster.worker.gpu \(1\) is less than the 2 GPUs"),
    ({"worker": {"cpu": "500m"}}, {"resources_per_worker": {"CPU": 1}}, r"spec.cluster.worker.cpu \(500m\) is less"),
    ({"workers_per_pod": 3}, {"num_workers": 4}, r"spec.cluster.workers_per_pod \(3\) must divide"),
    ({"tolerations": [{"operator": "Exists", "value": "x"}]}, {}, "spec.cluster.tolerations.0: value must be empty"),
    ({"tolerations": [{"key": "k", "toleration_seconds": 5}]}, {}, "toleration_seconds applies to effect: NoExecute"),
    ({"env": {"AWS_SECRET_ACCESS_KEY": "x"}}, {}, "spec.cluster.env: AWS_SECRET_ACCESS_KEY is a credential"),
    ({"env_secrets": ["Not A Name"]}, {}, "spec.cluster.env_secrets.0: String should match pattern"),
    ({"ttl_seconds_after_finished": -1}, {}, "spec.cluster.ttl_seconds_after_finished"),
    ({"active_deadline_seconds": 0}, {}, "spec.cluster.active_deadline_seconds: Input should be greater than 0"),
    ({"node_pool": "gpu"}, {}, "spec.cluster.node_pool: unknown field"),
])
def test_cluster_settings_are_checked(cluster, distributed, expected):
    doc = valid_doc()
    doc["spec"]["cluster"] = cluster
    doc["spec"]["distributed"].update(distributed)
    with pytest.raises(SpecError) as err:
        parse_job(doc)
    assert any(re.search(expected, line) for line in err.value.errors), err.value.errors


def test_cluster_settings_accepted_with_defaults():
    assert parse_job(valid_doc()).spec.cluster.queue is None  # optional: a document without it still runs
    doc = valid_doc()
    doc["spec"]["distributed"] = {"num_workers": 16, "use_gpu": True, "resources_per_worker": {"CPU": 8}}
    doc["spec"]["cluster"] = {"queue": "team-a", "workers_per_pod": 8, "worker": {"cpu": 64, "memory": "512Gi", "gpu": 8},
                              "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]}
    cluster = parse_job(doc).spec.cluster
    assert cluster.worker.cpu == "64"  # an int quantity is kept as Kubernetes writes it
    assert parse_job(doc).spec.ray_train_workers == 16


def test_quantity_values():
    assert quantity_value("500m") == 0.5
    assert quantity_value("2Gi") == 2 * 2**30
    assert quantity_value("1e3") == 1000.0
    with pytest.raises(ValueError, match="Kubernetes quantity"):
        quantity_value("2 GB")


# -- the document text: every entry point parses through parse_document_text ---------------------------------

def alias_bomb(levels: int = 9) -> str:
    """A job document of under 1 KiB whose model.overrides holds 9**levels strings, each level an anchored
    list of nine aliases of the one before (the kind of body that was stored as a 58 MB document)."""
    rows = ['        l0: &l0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    rows += [f"        l{i}: &l{i} [{','.join([f'*l{i - 1}'] * 9)}]" for i in range(1, levels)]
    return ("apiVersion: sdray.io/v1alpha1\nkind: DiffusionJob\nmetadata: {name: bomb}\nspec:\n"
            "  model:\n    preset: tiny\n    overrides:\n      unet:\n" + "\n".join(rows) +
            "\n  data: {uri: /tmp/data}\n  output: {uri: /tmp/out}\n")


def _refusal(text, fmt="yaml") -> str:
    with pytest.raises(SpecError) as err:
        parse_document_text(text, fmt, "body")
    assert len(err.value.errors) == 1 and err.value.source == "body"
    return err.value.errors[0]


def test_a_yaml_alias_bomb_is_refused_before_it_expands(tmp_path):
    bomb = alias_bomb()
    assert len(bomb.encode()) < 1024
    assert _refusal(bomb) == "YAML anchors and aliases (&name / *name) are not accepted in a job document (line 9)"
    (tmp_path / "bomb.yaml").write_text(bomb)  # the CLI's way in
    with pytest.raises(SpecError, match="YAML anchors and aliases"):
        load_job(tmp_path / "bomb.yaml")
    assert "anchors" in _refusal("spec: &s {a: 1}\n")  # an anchor alone too: it exists only for aliases


def test_duplicate_keys_are_refused_with_their_line():
    assert _refusal("metadata: {name: a}\nspec:\n  train: {max_steps: 1}\n  train: {max_steps: 2}\n") == \
        "duplicate key 'train' at line 4"
    assert _refusal('{"metadata": {"name": "a"},\n "spec": {"x": 1,\n  "x": 2}}', "json") == \
        "duplicate key 'x' at line 3"
    # the same key in two objects is no repeat
    assert parse_document_text('{"a": {"x": 1}, "b": {"x": 2}}', "json", "body") == {"a": {"x": 1}, "b": {"x": 2}}


@pytest.mark.parametrize("fmt", ["yaml", "json"])
def test_depth_and_size_limits(fmt):
    assert parse_document_text("[" * 64 + "]" * 64, fmt, "body") is not None
    assert _refusal("[" * 65 + "]" * 65, fmt).startswith("the document nests deeper than 64 levels")
    assert _refusal("[" * 100_000 + "]" * 100_000, fmt)  # refused, whatever the parser's own limit says
    assert _refusal("[" + ",".join(["1"] * 100_001) + "]", fmt).startswith(
        "the document holds more than 100000 values")
    assert _refusal(" " * MAX_DOCUMENT_BYTES + "[]", fmt) == "the document is larger than 1048576 bytes (1 MiB)"


def test_invalid_text_says_what_and_where():
    assert _refusal("spec: [unclosed") == ("not valid YAML: while parsing a flow sequence: did not find expected "
                                           "',' or ']' at line 2, column 1")
    assert _refusal("a: 1\n---\nb: 2\n").startswith("not valid YAML: expected a single document")
    assert _refusal('{"a": [1, 2', "json") == "not valid JSON: Expecting ',' delimiter at line 1, column 12"
    assert _refusal('{"a": NaN}', "json") == "not valid JSON: NaN is not a number JSON allows"


def test_yaml_gives_json_values_only():
    assert parse_document_text("a: 2024-01-01\nb: [1, 2.5, x, null, true]\n", "yaml", "b") == {
        "a": "2024-01-01", "b": [1, 2.5, "x", None, True]}  # a date stays a string, as in JSON
    assert _refusal("a: !!binary aGVsbG8=\n").startswith("YAML tag !!binary is not accepted in a job document")
    assert _refusal("a: !!set {x}\n").startswith("YAML tag !!set is not accepted")
    assert "could not determine a constructor" in _refusal("a: !!python/object/apply:os.system [touch x]\n")


def test_errors_never_echo_a_huge_input():
    doc = valid_doc()
    doc["spec"]["train"]["learning_rate"] = "x" * 500_000
    with pytest.raises(SpecError) as err:
        parse_job(doc)
    line = next(e for e in err.value.errors if e.startswith("spec.train.learning_rate"))
    assert len(line) < 400 and line.endswith("…)")
    doc = valid_doc()
    doc["spec"]["train"].update({f"unknown_{i}": i for i in range(200)})
    with pytest.raises(SpecError) as err:
        parse_job(doc)
    assert len(err.value.errors) == 51 and err.value.errors[-1] == "… and 150 more errors"


# -- numbers: finite and in range ---------------------------------------------------------------------------

@pytest.mark.parametrize("section, values, expected", [
    ("train", {"learning_rate": ".inf"}, "spec.train.learning_rate: Input should be a finite number"),
    ("train", {"seed": 2**70}, "spec.train.seed: Input should be less than or equal to 4294967295"),
    ("distributed", {"resources_per_worker": {"GPU": -100}},
     "spec.distributed.resources_per_worker.GPU: Input should be greater than or equal to 0"),
    ("distributed", {"resources_per_worker": {"CPU": ".nan"}},
     "spec.distributed.resources_per_worker.CPU: Input should be a finite number"),
    ("distributed", {"resources_per_worker": {"bad name!": 1}}, "spec.distributed.resources_per_worker.bad name!"),
    ("train", {"max_steps": 10**9}, "spec.train.max_steps: Input should be less than or equal to 100000000"),
    ("distributed", {"num_workers": 10**6}, "spec.distributed.num_workers: Input should be less than or equal"),
])
def test_numbers_out_of_range_are_refused_naming_the_field(section, values, expected):
    doc = valid_doc()
    doc["spec"][section].update(values)
    text = yaml.safe_dump(doc).replace("'.inf'", ".inf").replace("'.nan'", ".nan")  # YAML's infinity and NaN
    doc = parse_document_text(text, "yaml", "body")
    with pytest.raises(SpecError) as err:
        parse_job(doc)
    assert any(line.startswith(expected) for line in err.value.errors), err.value.errors


@pytest.mark.parametrize("where, value, expected", [
    (("model", "overrides"), {"unet": {"x": [1, {"y": float("nan")}]}},
     "spec.model.overrides.unet: expected a finite number, got nan (at x[1].y)"),
    (("model", "overrides"), {"unet": {"when": __import__("datetime").date(2024, 1, 1)}},
     "spec.model.overrides.unet: expected a JSON value"),
    (("tune",), {"search_space": {"train.learning_rate": {"choice": [float("inf")]}}},
     "spec.tune.search_space.train.learning_rate.choice: expected a finite number, got inf (at [0])"),
    (("tune",), {"search_space": {"train.learning_rate": {"uniform": [0.0, float("inf")]}}},
     "spec.tune.search_space.train.learning_rate.uniform.1: Input should be a finite number"),
    (("tune",), {"seed": -1}, "spec.tune.seed: Input should be greater than or equal to 0"),
    (("cluster",), {"worker": {"cpu": "1e400"}}, "spec.cluster.worker.cpu: a Kubernetes quantity must be below 2^63"),
])
def test_free_form_values_are_json_and_finite(where, value, expected):
    doc = valid_doc()
    node = doc["spec"]
    for key in where[:-1]:
        node = node.setdefault(key, {})
    node[where[-1]] = value
    with pytest.raises(SpecError) as err:
        parse_job(doc)
    assert any(line.startswith(expected) for line in err.value.errors), err.value.errors


@pytest.mark.parametrize("flow", [{}, {"resolution_shift": True}, {"shift": 3}, {"shift": 100.0, "mode_scale": -1.0},
                                  {"timestep_sampling": "mode", "mode_scale": 1.75, "loss_weighting": "cosmap",
                                   "precondition_outputs": True}])
def test_flow_matching_settings_accepted(flow):
    doc = valid_doc()
    doc["spec"]["train"]["flow"] = flow
    settings = parse_job(doc).spec.train.flow
    assert settings.model_dump(include=set(flow)) == flow
    assert parse_job(valid_doc()).spec.train.flow.shift is None  # the model family's default


@pytest.mark.parametrize("flow, expected", [
    ({"shift": 0}, "spec.train.flow.shift: Input should be greater than 0"),
    ({"shift": "fast"}, "spec.train.flow.shift: Input should be a valid number"),
    ({"shift": float("nan")}, "spec.train.flow.shift: Input should be a finite number"),
    ({"resolution_shift": "auto"}, "spec.train.flow.resolution_shift: Input should be a valid boolean"),
    ({"mode_scale": 2.0}, "spec.train.flow.mode_scale: Input should be less than or equal to 1.75"),
    ({"logit_std": 0}, "spec.train.flow.logit_std: Input should be greater than 0"),
    ({"logit_mean": float("inf")}, "spec.train.flow.logit_mean: Input should be a finite number"),
    ({"timestep_sampling": "sigmoid"}, "spec.train.flow.timestep_sampling: Input should be 'logit_normal', 'mode'"),
    ({"loss_weighting": "snr"}, "spec.train.flow.loss_weighting: Input should be 'none', 'sigma_sqrt' or 'cosmap'"),
])
def test_flow_matching_settings_refused_naming_the_field(flow, expected):
    doc = valid_doc()
    doc["spec"]["train"]["flow"] = flow
    with pytest.raises(SpecError) as err:
        parse_job(doc)
    assert any(line.startswith(expected) for line in err.value.errors), err.value.errors


def test_seeds_and_resources_at_their_bounds_are_accepted():
    doc = valid_doc()
    doc["spec"]["train"]["seed"] = 2**32 - 1
    doc["spec"]["distributed"]["resources_per_worker"] = {"CPU": 0.5, "GPU": 0, "accelerator_type:H100": 0.001,
                                                          "memory": 8e9}
    job = parse_job(doc)
    assert job.spec.train.seed == 2**32 - 1 and job.spec.distributed.gpus_per_worker == 0


# -- Kubernetes metadata and secret names ------------------------------------------------------------------

@pytest.mark.parametrize("path, value, expected", [
    ("metadata.labels", {"bad key!": "x"}, "metadata.labels.bad key!.[key]: expected a name of at most 63"),
    ("metadata.labels", {"Example.com/team": "x"}, "metadata.labels.Example.com/team.[key]: the prefix before '/'"),
    ("metadata.labels", {"a/b/c": "x"}, "metadata.labels.a/b/c.[key]"),
    ("metadata.labels", {"x" * 64: "x"}, "metadata.labels.xxx"),
    ("metadata.labels", {"team": "v" * 64}, "metadata.labels.team: String should have at most 63 characters"),
    ("metadata.labels", {"team": "-a"}, "metadata.labels.team: String should match pattern"),
    ("metadata.namespace", "Team_A", "metadata.namespace: String should match pattern"),
    ("spec.cluster.node_selector", {"bad key!": "x"}, "spec.cluster.node_selector.bad key!.[key]"),
    ("spec.data.credentials_secret", "../other-tenant-secret", "spec.data.credentials_secret: String should match"),
    ("spec.storage.credentials_secret", "/etc/sdray", "spec.storage.credentials_secret: String should match"),
])
def test_kubernetes_names_are_checked_as_the_api_server_does(path, value, expected):
    doc = _set(valid_doc(), path, value)
    with pytest.raises(SpecError) as err:
        parse_job(doc)
    assert any(line.startswith(expected) for line in err.value.errors), err.value.errors


def test_valid_labels_are_accepted():
    labels = {"app.kubernetes.io/name": "sdray", "team": "", "a": "b.c-d_e", "x" * 63: "y" * 63,
              "example.com/" + "k" * 63: "v"}
    doc = _set(valid_doc(), "metadata.labels", labels)
    doc["metadata"]["namespace"] = "team-a"
    assert parse_job(doc).metadata.labels == labels


def test_stage_unet_is_still_read_as_the_denoiser_stage():
    doc = valid_doc()
    doc["spec"]["stage"] = "unet"  # documents written before model families
    assert parse_job(doc).spec.stage == "denoiser"
    doc["spec"]["stage"] = "transformer"
    with pytest.raises(SpecError, match="spec.stage"):
        parse_job(doc)


# -- bare names: an object whose only required field is its name may be written as that name ----------------
_SEARCH = {"search_space": {"train.learning_rate": {"loguniform": [1e-5, 1e-3]}}, "metric": "loss"}


def _named_objects() -> list[tuple[str, type]]:
    """Every object of the job model (dotted path, model) whose fields all have defaults and that selects by
    a ``name`` Literal: the ones the bare-name form is for. Found by walking the model, so a new one is
    covered (or fails here) without being listed."""
    import typing

    from pydantic import BaseModel

    from sdray.spec import JobSpec

    found, stack = [], [("spec", JobSpec)]
    while stack:
        path, model = stack.pop()
        for name, info in model.model_fields.items():
            for arg in typing.get_args(info.annotation) or (info.annotation,):
                inner = typing.get_args(arg)[0] if typing.get_origin(arg) is typing.Annotated else arg
                if isinstance(inner, type) and issubclass(inner, BaseModel):
                    fields = inner.model_fields
                    if "name" in fields and not any(f.is_required() for f in fields.values()):
                        found.append((f"{path}.{name}", inner))
                    stack.append((f"{path}.{name}", inner))
    return sorted(found, key=lambda item: item[0])


def test_the_named_objects_are_the_optimizer_and_the_scheduler():
    assert [path for path, _ in _named_objects()] == ["spec.train.optimizer", "spec.tune.scheduler"]


@pytest.mark.parametrize("path, model", _named_objects(), ids=lambda v: v if isinstance(v, str) else "")
def test_every_named_object_takes_its_bare_name(path, model):
    import typing

    for name in typing.get_args(model.model_fields["name"].annotation):
        doc = make_job("bare-name", "/tmp/out", "s3://bucket/digits", tune=dict(_SEARCH))
        section, field = path.split(".")[1:]
        doc["spec"][section][field] = name
        parsed = getattr(getattr(parse_job(doc).spec, section), field)
        assert parsed == model(name=name)  # the same as {name: NAME}, with the other fields' defaults
        # stored and sent on in the object form
        assert parse_job(doc).model_dump(mode="json")["spec"][section][field]["name"] == name


def test_scheduler_shorthand_from_the_readme():
    job = parse_job(parse_document_text("apiVersion: sdray.io/v1alpha1\nkind: DiffusionJob\nmetadata: {name: search}\n"
                              "spec:\n  model: {preset: tiny}\n  data: {uri: s3://b/d, validation_fraction: 0.1}\n"
                              "  output: {uri: s3://b/out}\n  train: {optimizer: adamw}\n"
                              "  tune:\n    scheduler: asha\n    search_space:\n"
                              "      train.learning_rate: {loguniform: [1.0e-5, 1.0e-3]}\n", "yaml", "job.yaml"))
    assert job.spec.tune.scheduler.name == "asha" and job.spec.tune.scheduler.reduction_factor == 2.0
    assert job.spec.train.optimizer.name == "adamw"


@pytest.mark.parametrize("section, field, value, names", [
    ("tune", "scheduler", "ahsa", "fifo, asha, pbt"),
    ("tune", "scheduler", 5, "fifo, asha, pbt"),
    ("train", "optimizer", "sgd", "adamw"),
])
def test_a_wrong_bare_name_is_one_line_naming_the_field_and_the_names(section, field, value, names):
    doc = make_job("bare-name", "/tmp/out", "s3://bucket/digits", tune=dict(_SEARCH))
    doc["spec"][section][field] = value
    with pytest.raises(SpecError) as err:
        parse_job(doc)
    assert err.value.errors == [f"spec.{section}.{field}: expected one of {names} (or an object with a name) "
                                f"(got {value!r})"]


def test_the_object_form_still_checks_its_fields():
    doc = make_job("bare-name", "/tmp/out", "s3://bucket/digits",
                   tune={**_SEARCH, "scheduler": {"name": "fifo", "grace_period": 10}})
    with pytest.raises(SpecError, match="grace_period applies to scheduler asha only"):
        parse_job(doc)


def test_the_json_schema_shows_both_forms():
    scheduler = json_schema()["$defs"]["TuneSpec"]["properties"]["scheduler"]
    assert {"type": "string", "enum": ["fifo", "asha", "pbt"]} in scheduler["anyOf"]
    assert {"$ref": "#/$defs/TuneSchedulerSpec"} in scheduler["anyOf"]
