"""The tenant policy on its own (no service): each governed field, allowed and refused, with the rule named;
paths compared after normalisation; a search's candidate values checked like the document's own."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from conftest import make_job
from sdray.service.policy import Policy, PolicyError
from sdray.spec import parse_job


def policy(tmp_path: Path, text: str) -> Policy:
    path = tmp_path / "policy.yaml"
    path.write_text(text)
    return Policy.load(path)


def job(tmp_path: Path, **spec):
    doc = make_job("p-job", tmp_path / "team-a" / "out", str(tmp_path / "team-a" / "data"))
    for section, values in spec.items():
        doc["spec"][section] = {**doc["spec"].get(section, {}), **values}
    return parse_job(doc)


@pytest.fixture
def team_policy(tmp_path) -> Policy:
    return policy(tmp_path, f"""
default:
  local_paths: []
tenants:
  alice:
    namespace: team-a
    local_paths: [{tmp_path / 'team-a'}]
    s3_prefixes: [s3://team-a/]
    endpoints: [http://127.0.0.1:8333]
    secrets: [team-a-s3]
    service_accounts: [team-a-runner]
    images: [registry.example/team-a/sdray:1.0]
    priority_classes: [team-a-low]
    queues: [team-a]
    env: [HF_HOME]
    node_selectors: ["pool=gpu-a", "zone=*"]
    tolerations: [team-a-gpu]
    max_workers: 4
""")


def rules(refusals) -> dict[str, str]:
    return {r.field: r.rule for r in refusals}


def test_a_tenant_names_only_what_its_policy_allows(tmp_path, team_policy):
    allowed = job(tmp_path, data={"uri": str(tmp_path / "team-a" / "data"), "endpoint": "http://127.0.0.1:8333/",
                                  "credentials_secret": "team-a-s3"},
                  checkpoint={"uri": "s3://team-a/ckpt", "every_n_steps": 10},
                  cluster={"service_account": "team-a-runner", "image": "registry.example/team-a/sdray:1.0",
                           "priority_class": "team-a-low", "queue": "team-a", "env_secrets": ["team-a-s3"],
                           "env": {"HF_HOME": "/cache"}, "node_selector": {"pool": "gpu-a", "zone": "eu-1"},
                           "tolerations": [{"key": "team-a-gpu", "operator": "Exists"}]},
                  distributed={"num_workers": 4, "resources_per_worker": {"CPU": 1}})
    assert team_policy.check("alice", allowed) == []


def test_every_cluster_field_of_the_attack_is_refused_with_its_rule(tmp_path, team_policy):
    """The issue's attack: the service's ServiceAccount, a miner image, the system priority class, another
    team's queue, another tenant's and the platform's secrets, another tenant's credentials."""
    attack = job(tmp_path, data={"uri": str(tmp_path / "team-a" / "data"), "credentials_secret": "team-b-s3"},
                 cluster={"service_account": "sdray-service", "image": "attacker/miner",
                          "priority_class": "system-cluster-critical", "queue": "team-b",
                          "env_secrets": ["team-b-s3", "sdray-tokens"]})
    for tenant in ("alice", "mallory"):  # a listed tenant and one that gets the default block
        refused = team_policy.check(tenant, attack)
        assert rules(refused) == {
            "spec.data.credentials_secret": "secrets", "spec.cluster.service_account": "service_accounts",
            "spec.cluster.image": "images", "spec.cluster.priority_class": "priority_classes",
            "spec.cluster.queue": "queues", "spec.cluster.env_secrets[0]": "secrets",
            "spec.cluster.env_secrets[1]": "secrets", **({"spec.data.uri": "local_paths",
                                                          "spec.output.uri": "local_paths"} if tenant == "mallory" else {}),
        }, tenant
    message = next(r.message for r in team_policy.check("alice", attack) if r.field == "spec.cluster.image")
    assert "'attacker/miner'" in message and "tenants.alice.images" in message


@pytest.mark.parametrize("uri, allowed", [
    ("{root}/team-a/data", True),
    ("file://{root}/team-a/data", True),
    ("{root}/team-a/../team-b/data", False),        # .. climbs out
    ("{root}/team-a-evil/data", False),             # a prefix of the name is not a parent directory
    ("{root}/team-a/link-to-b/data", False),        # a symbolic link out of the allowed tree
    ("team-a/data", False),                         # relative: depends on where the job runs
    ("/etc", False),
    ("s3://team-a/data", True),
    ("s3://team-b/data", False),
    ("s3://team-a/../team-b", False),
    ("gs://team-a/data", False),
    ("http://169.254.169.254/latest", False),
])
def test_uris_are_compared_after_normalisation(tmp_path, team_policy, uri, allowed):
    (tmp_path / "team-a").mkdir()
    (tmp_path / "team-b").mkdir()
    os.symlink(tmp_path / "team-b", tmp_path / "team-a" / "link-to-b")
    uri = uri.format(root=tmp_path)
    for field in ("data", "output", "checkpoint"):
        refused = rules(team_policy.check("alice", job(tmp_path, **{field: {"uri": uri}})))
        assert (f"spec.{field}.uri" not in refused) is allowed, (field, uri, refused)


def test_pretrained_resume_and_vae_uris_are_governed_too(tmp_path, team_policy):
    doc = job(tmp_path, model={"pretrained": "/srv/platform/models", "vae": {"pretrained": "/root/vae"},
                               "tokenizer": "/etc/tok"},
              checkpoint={"resume": "/home/bob/ckpt", "every_n_steps": 10})
    assert {"spec.model.pretrained", "spec.model.vae.pretrained", "spec.model.tokenizer",
            "spec.checkpoint.resume"} <= set(rules(team_policy.check("alice", doc)))
    fresh = job(tmp_path, checkpoint={"resume": "never", "every_n_steps": 10})
    assert team_policy.check("alice", fresh) == []


@pytest.mark.parametrize("source, allowed", [
    ("hf://team-a-org/model", True),
    ("hf://team-a-org/model@v2", True),
    ("hf://TEAM-A-ORG/Model", True),                # the Hub's names are case-insensitive
    ("hf://public-org/sd-base", True),              # one repository listed
    ("hf://public-org/sd-base-evil", False),
    ("hf://public-org/other", False),               # the organisation is not listed
    ("hf://team-a-org-evil/model", False),          # a prefix of the organisation is not it
    ("hf://team-b-org/model", False),
    ("team-a-org/model", False),                    # bare: a relative path where the job runs
])
def test_hub_repositories_are_allowed_by_organisation_or_by_name(tmp_path, source, allowed):
    p = policy(tmp_path, "tenants: {alice: {hub_repos: [team-a-org/*, public-org/sd-base]}}\n")
    for model in ({"pretrained": source}, {"preset": "tiny", "vae": {"pretrained": source}},
                  {"preset": "tiny", "tokenizer": source}):
        refused = {r.field: r for r in p.check("alice", job(tmp_path, model=model))
                   if r.field.startswith("spec.model")}
        assert (not refused) is allowed, (model, refused)
        if not allowed:
            (refusal,) = refused.values()
            assert refusal.rule == ("hub_repos" if source.startswith("hf://") else "local_paths")
            assert "tenants.alice.hub_repos" in refusal.message or "hf://" in refusal.message
    assert rules(p.check("mallory", job(tmp_path, model={"pretrained": "hf://team-a-org/model"}))) == {
        "spec.model.pretrained": "hub_repos", "spec.data.uri": "local_paths", "spec.output.uri": "local_paths"}


def test_a_hub_token_secret_is_one_of_the_tenants_secrets(tmp_path, team_policy):
    doc = job(tmp_path, model={"pretrained": str(tmp_path / "team-a" / "m"), "hub": {"credentials_secret": "team-b-hf"}})
    assert rules(team_policy.check("alice", doc)) == {"spec.model.hub.credentials_secret": "secrets"}
    own = job(tmp_path, model={"pretrained": str(tmp_path / "team-a" / "m"), "hub": {"credentials_secret": "team-a-s3"}})
    assert team_policy.check("alice", own) == []


def test_an_endpoint_the_policy_does_not_list_is_refused(tmp_path, team_policy):
    """Naming an endpoint sends the job's S3 credentials there: only listed ones (or the default) go."""
    for endpoint in ("http://169.254.169.254", "http://127.0.0.1:8000", "https://attacker.example"):
        refused = team_policy.check("alice", job(tmp_path, storage={"endpoint": endpoint}))
        assert rules(refused) == {"spec.storage.endpoint": "endpoints"}, endpoint
    assert team_policy.check("alice", job(tmp_path, storage={"endpoint": "HTTP://127.0.0.1:8333"})) == []


def test_env_placement_resources_workers_and_namespace(tmp_path, team_policy):
    doc = job(tmp_path, cluster={"env": {"AWS_ENDPOINT_URL": "http://evil", "LD_PRELOAD": "/x.so"},
                                 "node_selector": {"pool": "gpu-b"}, "tolerations": [{"operator": "Exists"}]},
              distributed={"num_workers": 5, "resources_per_worker": {"CPU": 1, "node:10.0.0.7": 0.01}})
    assert rules(team_policy.check("alice", doc)) == {
        "spec.cluster.env.AWS_ENDPOINT_URL": "env", "spec.cluster.env.LD_PRELOAD": "env",
        "spec.cluster.node_selector.pool": "node_selectors", "spec.cluster.tolerations[0]": "tolerations",
        "spec.distributed.resources_per_worker.node:10.0.0.7": "resources",
        "spec.distributed.num_workers": "max_workers",
    }
    other = parse_job({**make_job("ns", tmp_path / "team-a" / "o", str(tmp_path / "team-a" / "d")),
                       "metadata": {"name": "ns", "namespace": "team-b"}})
    assert rules(team_policy.check("alice", other)) == {"metadata.namespace": "namespace"}


def test_a_search_cannot_reach_through_its_search_space(tmp_path, team_policy):
    doc = job(tmp_path, tune={"search_space": {"data.uri": {"choice": [str(tmp_path / "team-a" / "data"), "/etc"]}},
                                       "metric": "loss"})
    refused = team_policy.check("alice", doc)
    assert rules(refused) == {"spec.tune.search_space.data.uri": "local_paths"}
    assert "'/etc'" in refused[0].message
    # Concurrent trials multiply the workers that count against max_workers.
    wide = job(tmp_path, distributed={"num_workers": 2},
               tune={"search_space": {"train.learning_rate": {"choice": [1e-3, 1e-4]}}, "max_concurrent_trials": 3,
                     "metric": "loss"})
    assert rules(team_policy.check("alice", wide)) == {"spec.distributed.num_workers": "max_workers"}


def test_without_a_file_the_default_allows_nothing_beyond_the_services_defaults(tmp_path):
    default = Policy.load(None)
    assert default.check("anyone", job(tmp_path, output={"uri": "s3://models/x"},
                                       data={"uri": "s3://datasets/digits"})) == []
    assert set(rules(default.check("anyone", job(tmp_path)))) == {"spec.data.uri", "spec.output.uri"}
    assert set(rules(default.check("anyone", job(tmp_path, cluster={"image": "x/y"},
                                             data={"uri": "s3://d/x"}, output={"uri": "s3://m/x"})))) == {
        "spec.cluster.image"}


def test_a_tenant_block_overrides_the_default_field_by_field(tmp_path):
    p = policy(tmp_path, "default: {images: [base:1], max_workers: 2}\ntenants: {alice: {max_workers: 6}}\n")
    assert p.for_tenant("alice").images == ["base:1"] and p.for_tenant("alice").max_workers == 6
    assert p.rule_name("alice", "images") == "default.images"
    assert p.rule_name("alice", "max_workers") == "tenants.alice.max_workers"


@pytest.mark.parametrize("text, where", [
    ("tenants: {alice: {imagez: []}}", "tenants.alice.imagez"),
    ("tenants: {'Alice!': {}}", "tenants.Alice!"),
    ("default: {max_workers: 0}", "default.max_workers"),
    ("default: [", "not valid YAML"),
])
def test_a_broken_policy_file_is_refused_with_its_place(tmp_path, text, where):
    with pytest.raises(PolicyError, match=r"policy\.yaml: .*" + where.replace(".", r"\.").replace("!", "!")):
        policy(tmp_path, text)



# -- pod fields (issue #16): labels, annotations, node affinity, volumes, scheduler, accelerator --------------------

def pod_job(tmp_path: Path, cluster: dict):
    """A job whose URIs every policy allows (s3://, no s3_prefixes list), with ``cluster``."""
    return job(tmp_path, data={"uri": "s3://team-a/data"}, output={"uri": "s3://team-a/out"}, cluster=cluster)


@pytest.fixture
def pods_policy(tmp_path) -> Policy:
    return policy(tmp_path, """
tenants:
  alice:
    node_selectors: ["pool=gpu-a", "zone=*"]
    pod_labels: [team, "example.com/*"]
    pod_annotations: ["*"]
    volume_claims: [team-a-data, "shared-models:ro"]
    config_maps: [team-a-prompts]
    scheduler_names: [volcano]
    accelerator_resources: [amd.com/gpu]
""")


def test_a_tenants_pod_fields_pass_when_its_policy_lists_them(tmp_path, pods_policy):
    allowed = pod_job(tmp_path, cluster={
        "pod_labels": {"team": "a", "example.com/cost": "ml"}, "pod_annotations": {"example.org/anything": "x"},
        "node_affinity": {"required": [{"match_expressions": [{"key": "pool", "operator": "In", "values": ["gpu-a"]},
                                                              {"key": "zone", "operator": "NotIn", "values": ["b"]}]}]},
        "volumes": [{"name": "d", "mount_path": "/data", "persistent_volume_claim": "team-a-data", "read_only": False},
                    {"name": "m", "mount_path": "/models", "persistent_volume_claim": "shared-models"},
                    {"name": "p", "mount_path": "/prompts", "config_map": "team-a-prompts"}],
        "scheduler_name": "volcano", "accelerator_resource": "amd.com/gpu"})
    assert pods_policy.check("alice", allowed) == []


def test_every_pod_field_of_the_attack_is_refused_with_its_rule(tmp_path, pods_policy):
    """The attacks: another tenant's claim, writing to a claim shared read-only, the platform's ConfigMap, a
    scheduler and an accelerator the tenant was not given, steering onto another team's nodes, and labels the
    tenant may not set."""
    attack = pod_job(tmp_path, cluster={
        "pod_labels": {"owner": "x"}, "pod_annotations": {"example.org/ok": "x"},
        "node_affinity": {"required": [{"match_expressions": [{"key": "pool", "operator": "In", "values": ["gpu-b"]}]}],
                          "preferred": [{"weight": 1, "match_expressions": [{"key": "pool", "operator": "NotIn",
                                                                             "values": ["gpu-a"]}]}]},
        "volumes": [{"name": "b", "mount_path": "/b", "persistent_volume_claim": "team-b-data"},
                    {"name": "m", "mount_path": "/models", "persistent_volume_claim": "shared-models", "read_only": False},
                    {"name": "p", "mount_path": "/p", "config_map": "sdray-policy"}],
        "scheduler_name": "default-scheduler-2", "accelerator_resource": "habana.ai/gaudi"})
    refused = pods_policy.check("alice", attack)
    assert rules(refused) == {
        "spec.cluster.pod_labels.owner": "pod_labels",
        "spec.cluster.node_affinity.required[0].match_expressions[0]": "node_selectors",
        "spec.cluster.node_affinity.preferred[0].match_expressions[0]": "node_selectors",
        "spec.cluster.volumes[0]": "volume_claims", "spec.cluster.volumes[1]": "volume_claims",
        "spec.cluster.volumes[2]": "config_maps",
        "spec.cluster.scheduler_name": "scheduler_names", "spec.cluster.accelerator_resource": "accelerator_resources",
    }
    messages = {r.field: r.message for r in refused}
    assert "'team-b-data' is not allowed" in messages["spec.cluster.volumes[0]"]
    assert "may only be mounted read-only" in messages["spec.cluster.volumes[1]"]
    assert "tenants.alice.volume_claims" in messages["spec.cluster.volumes[1]"]
    # A tenant on the default block may name none of these.
    assert set(rules(pods_policy.check("mallory", attack))) >= set(rules(refused)) | {"spec.cluster.pod_annotations.example.org/ok"}


@pytest.mark.parametrize("key", ["kueue.x-k8s.io/queue-name", "sdray.io/job", "app.kubernetes.io/name",
                                 "ray.io/cluster", "scheduling.x-k8s.io/pod-group", "volcano.sh/queue-name"])
def test_the_platforms_keys_are_refused_even_where_the_policy_allows_every_key(tmp_path, key):
    """Jumping a queue or passing another job's NetworkPolicy by a label: no list of the policy allows it."""
    everything = policy(tmp_path, "default: {pod_labels: ['*'], pod_annotations: ['*']}\n")
    for field in ("pod_labels", "pod_annotations"):
        refused = everything.check("anyone", pod_job(tmp_path, cluster={field: {key: "team-b", "team": "a"}}))
        assert rules(refused) == {f"spec.cluster.{field}.{key}": "reserved_keys"}, refused
        assert "reserved to the platform" in refused[0].message


@pytest.mark.parametrize("text, where", [
    ("default: {volume_claims: ['team-a:rw']}", "default.volume_claims.0"),
    ("default: {pod_labels: ['bad key']}", "default.pod_labels.0"),
    ("default: {scheduler_names: [Volcano]}", "default.scheduler_names.0"),
])
def test_a_broken_pod_rule_is_refused_with_its_place(tmp_path, text, where):
    with pytest.raises(PolicyError, match=r"policy\.yaml: " + re.escape(where)):
        policy(tmp_path, text)
