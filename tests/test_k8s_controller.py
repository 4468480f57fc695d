"""The controller against an in-process fake API server, over real HTTP through the official client.

Every wait is on a condition of the fake server's store (or the Lease), with a deadline: no sleeps.
What the controller stores is checked against the real schemas at the end of each test.
"""

from __future__ import annotations

import dataclasses
from datetime import datetime, timedelta

import pytest
import yaml
from conftest import make_job
from k8s_cluster import (NS, SETTINGS, chart_objects, check_store, conditions, connect, events, kube, running,  # noqa: F401
                         status_of, submit, user, wait_state, write_kubeconfig)
from kubernetes.client import ApiException

from sdray.k8s.controller import WorkQueue, changed_paths
from sdray.k8s.kube import Clients, delete_diffusionjob
from sdray.k8s.progress import StatusReporter
from sdray.k8s.render import SPEC_HASH

IDENTITY = ("serviceaccounts", "roles", "rolebindings")
BESIDE = ("configmaps", *IDENTITY, "networkpolicies")  # what the controller makes beside each RayJob


def _pod_account(rayjob) -> str:
    """The ServiceAccount the RayJob's head and workers run as (they must agree)."""
    cluster = rayjob["spec"]["rayClusterSpec"]
    accounts = {cluster["headGroupSpec"]["template"]["spec"].get("serviceAccountName"),
                *(g["template"]["spec"].get("serviceAccountName") for g in cluster["workerGroupSpecs"])}
    assert len(accounts) == 1, accounts
    return accounts.pop()


def test_create_makes_an_owned_configmap_and_rayjob(kube, user):
    with running(kube):
        dj = submit(user, "digits")
        rayjob = kube.wait(lambda: kube.get("rayjobs", NS, "digits"), 10, "the RayJob")
        status = wait_state(kube, "digits", "Pending")
    configmap = kube.get("configmaps", NS, "digits-job")
    owner = [{"apiVersion": "sdray.io/v1alpha1", "kind": "DiffusionJob", "name": "digits",
              "uid": dj["metadata"]["uid"], "controller": True, "blockOwnerDeletion": True}]
    assert rayjob["metadata"]["ownerReferences"] == configmap["metadata"]["ownerReferences"] == owner
    assert yaml.safe_load(configmap["data"]["job.yaml"])["metadata"] == {"name": "digits", "namespace": NS}
    assert rayjob["spec"]["entrypoint"] == "sdray train /etc/sdray/job.yaml --address auto"
    assert (status["rayJobName"], status["observedGeneration"], status["appliedGeneration"]) == ("digits", 1, 1)
    assert conditions(status)["Admitted"] == ("True", "Admitted")
    assert ("Normal", "Created", "created RayJob digits") in events(kube, "digits")
    check_store(kube)


def test_each_job_gets_its_own_identity_and_network_policy_which_go_with_it(kube, user):
    with running(kube):
        dj = submit(user, "solo")
        rayjob = kube.wait(lambda: kube.get("rayjobs", NS, "solo"), 10, "the RayJob")
        uid = dj["metadata"]["uid"]
        assert _pod_account(rayjob) == "sdray-job-solo"
        for plural, name in [*((p, "sdray-job-solo") for p in IDENTITY), ("networkpolicies", "solo-ray")]:
            obj = kube.get(plural, NS, name)
            assert [r["uid"] for r in obj["metadata"]["ownerReferences"]] == [uid], plural
        assert kube.get("roles", NS, "sdray-job-solo")["rules"] == [{
            "apiGroups": ["sdray.io"], "resources": ["diffusionjobs/status"], "resourceNames": ["solo"],
            "verbs": ["patch"]}]
        assert rayjob["spec"]["rayClusterSpec"]["authOptions"] == {"mode": "token"}
        check_store(kube)
        delete_diffusionjob(user, NS, "solo")
        kube.wait(lambda: not any(kube.objects(p) for p in ("rayjobs", *BESIDE)), 10, "the cascade")


def test_a_jobs_pods_cannot_write_another_jobs_status(kube, user):
    with running(kube):
        submit(user, "alpha")
        submit(user, "beta")
        alpha = kube.wait(lambda: kube.get("rayjobs", NS, "alpha"), 10, "alpha's RayJob")
        kube.wait(lambda: kube.get("rayjobs", NS, "beta"), 10, "beta's RayJob")
        kube.update_status("rayjobs", NS, "beta", {"jobDeploymentStatus": "Running", "jobStatus": "RUNNING"})
        wait_state(kube, "beta", "Running")
    # Code in alpha's Ray pods holds alpha's ServiceAccount token: it tries to mark beta succeeded.
    pod = connect(kube, "alpha-pod", kube.token_for(NS, _pod_account(alpha)))
    try:
        for attack in (
                lambda: pod.custom.patch_namespaced_custom_object_status(
                    "sdray.io", "v1alpha1", NS, "diffusionjobs", "beta", {"status": {"state": "Succeeded"}}),
                lambda: pod.custom.patch_namespaced_custom_object(
                    "sdray.io", "v1alpha1", NS, "diffusionjobs", "beta", {"spec": {"train": {"max_steps": 1}}}),
                lambda: pod.custom.list_namespaced_custom_object("sdray.io", "v1alpha1", NS, "diffusionjobs"),
                lambda: pod.core.read_namespaced_secret("beta-env", NS)):
            with pytest.raises(ApiException) as refused:
                attack()
            assert refused.value.status == 403
        assert status_of(kube, "beta")["state"] == "Running"
        # Its own job's step and loss it may write, as the driver does.
        reporter = StatusReporter(pod, NS, "alpha")
        reporter({"step": 5, "loss": 0.5}, final=True)
        assert (status_of(kube, "alpha")["step"], status_of(kube, "alpha")["loss"]) == (5, 0.5)
        StatusReporter(pod, NS, "beta")({"step": 999, "loss": 0.0}, final=True)  # refused, logged, never raised
        assert "step" not in status_of(kube, "beta")
    finally:
        pod.close()
    # No rule bound to alpha's identity names beta, or any job but alpha.
    for binding in kube.objects("rolebindings", NS):
        if any(s["name"] == _pod_account(alpha) for s in binding["subjects"]):
            role = kube.get("roles", NS, binding["roleRef"]["name"])
            assert all(r.get("resourceNames") == ["alpha"] for r in role["rules"]), role


def test_a_document_naming_another_jobs_identity_fails_without_a_rayjob(kube, user):
    with running(kube):
        submit(user, "victim")
        kube.wait(lambda: kube.get("serviceaccounts", NS, "sdray-job-victim"), 10, "the victim's identity")
        submit(user, "thief", cluster={"service_account": "sdray-job-victim"})
        failed = wait_state(kube, "thief", "Failed")
    assert conditions(failed)["Failed"] == ("True", "InvalidSpec")
    assert "spec.cluster.service_account" in failed["message"]
    assert kube.get("rayjobs", NS, "thief") is None


def test_a_document_may_name_only_the_service_accounts_the_controller_allows(kube, user):
    """Whoever may create a DiffusionJob gets pods: naming the service's or the controller's ServiceAccount
    must not make them run as it."""
    with running(kube, render=dataclasses.replace(SETTINGS, allowed_service_accounts=("team-a-s3",))):
        for name, account in (("steal-service", "sdray-service"), ("steal-controller", "sdray-controller")):
            submit(user, name, cluster={"service_account": account})
            failed = wait_state(kube, name, "Failed")
            assert conditions(failed)["Failed"] == ("True", "InvalidSpec")
            assert f"'{account}' is not among the ServiceAccounts" in failed["message"]
            assert kube.get("rayjobs", NS, name) is None
        submit(user, "allowed", cluster={"service_account": "team-a-s3"})
        rayjob = kube.wait(lambda: kube.get("rayjobs", NS, "allowed"), 10, "the allowed job's RayJob")
    head = rayjob["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    assert head["serviceAccountName"] == "team-a-s3"


def test_pod_fields_the_controller_refuses_fail_the_job_without_a_rayjob(kube, user):
    """Whoever may create a DiffusionJob (no tenant policy on this path): a pod label that passes another job's
    NetworkPolicy, one that jumps a Kueue queue, and the service's own database claim are refused."""
    settings = dataclasses.replace(SETTINGS, allowed_volume_claims=("team-a-data",))
    attacks = {"net": ({"pod_labels": {"sdray.io/job": "victim"}}, "spec.cluster.pod_labels.sdray.io/job"),
               "jump": ({"pod_annotations": {"kueue.x-k8s.io/queue-name": "urgent"}},
                        "spec.cluster.pod_annotations.kueue.x-k8s.io/queue-name"),
               "db": ({"volumes": [{"name": "db", "mount_path": "/db", "persistent_volume_claim": "sdray-data",
                                    "read_only": False}]}, "PersistentVolumeClaim 'sdray-data' is not among")}
    with running(kube, render=settings):
        for name, (cluster, message) in attacks.items():
            submit(user, name, cluster=cluster)
        for name, (cluster, message) in attacks.items():
            failed = wait_state(kube, name, "Failed")
            assert conditions(failed)["Failed"] == ("True", "InvalidSpec")
            assert message in failed["message"], failed["message"]
            assert kube.get("rayjobs", NS, name) is None


def test_an_identity_made_by_someone_else_is_never_adopted(kube, user):
    # Made before the job, so that its pods would run as a ServiceAccount the maker holds tokens for.
    planted = {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "sdray-job-target", "namespace": NS}}
    user.core.create_namespaced_service_account(NS, planted)
    with running(kube):
        submit(user, "target")
        failed = wait_state(kube, "target", "Failed")
    assert conditions(failed)["Failed"] == ("True", "NameConflict")
    assert "ServiceAccount named sdray-job-target" in failed["message"]
    assert kube.get("rayjobs", NS, "target") is None and kube.objects("rolebindings") == []
    assert "ownerReferences" not in kube.get("serviceaccounts", NS, "sdray-job-target")["metadata"]


def test_the_charts_controller_role_is_enough_and_grants_the_job_role_without_escalation(kube, user):
    # The chart's Roles and RoleBindings (release "sdray" in NS), enforced by the fake API server's RBAC and
    # its escalation check: the controller runs as the chart's ServiceAccount.
    rbac = [o for o in chart_objects(NS) if o["kind"] in ("Role", "RoleBinding")]
    for obj in sorted(rbac, key=lambda o: o["kind"]):  # Roles first
        plural = {"Role": "roles", "RoleBinding": "rolebindings"}[obj["kind"]]
        user.custom.create_namespaced_custom_object("rbac.authorization.k8s.io", "v1", NS, plural, obj)
    with running(kube, "chart", token=kube.token_for(NS, "sdray-controller")):
        submit(user, "charted")
        kube.wait(lambda: kube.get("rayjobs", NS, "charted"), 10, "the RayJob")
        wait_state(kube, "charted", "Pending")
    mine = [r for r in kube.requests if r["agent"] == "controller/chart"]
    assert mine and all(r.get("user") == (NS, "sdray-controller") for r in mine)
    assert [r for r in mine if r["code"] in (401, 403)] == []
    for plural in BESIDE:
        assert len(kube.created(plural, "controller/chart")) == 1, plural


def test_status_and_conditions_follow_the_rayjob(kube, user):
    with running(kube):
        submit(user, "follow")
        kube.wait(lambda: kube.get("rayjobs", NS, "follow"), 10, "the RayJob")
        kube.update_status("rayjobs", NS, "follow", {"jobDeploymentStatus": "Initializing"})
        wait_state(kube, "follow", "Pending")
        kube.update_status("rayjobs", NS, "follow", {"jobDeploymentStatus": "Running", "jobStatus": "RUNNING",
                                                     "startTime": "2026-05-01T10:00:00Z"})
        running_status = wait_state(kube, "follow", "Running")
        assert conditions(running_status) == {"Admitted": ("True", "Admitted"), "Running": ("True", "Running"),
                                              "Succeeded": ("False", "Running"), "Failed": ("False", "Running")}
        assert running_status["startTime"] == "2026-05-01T10:00:00Z"
        kube.update_status("rayjobs", NS, "follow", {"jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED",
                                                     "endTime": "2026-05-01T11:00:00Z"})
        done = wait_state(kube, "follow", "Succeeded")
    assert done["completionTime"] == "2026-05-01T11:00:00Z"
    assert conditions(done)["Succeeded"] == ("True", "Succeeded")
    assert conditions(done)["Running"][0] == "False"
    running_since = next(c for c in running_status["conditions"] if c["type"] == "Admitted")["lastTransitionTime"]
    assert next(c for c in done["conditions"] if c["type"] == "Admitted")["lastTransitionTime"] == running_since
    assert [r for _, r, _ in events(kube, "follow") if r in ("Running", "Succeeded")] == ["Running", "Succeeded"]
    check_store(kube)


def test_failed_rayjob_fails_the_job_with_its_reason(kube, user):
    with running(kube):
        submit(user, "doomed")
        kube.wait(lambda: kube.get("rayjobs", NS, "doomed"), 10, "the RayJob")
        kube.update_status("rayjobs", NS, "doomed", {"jobDeploymentStatus": "Failed", "jobStatus": "FAILED",
                                                     "reason": "DeadlineExceeded", "message": "past 3600 s"})
        failed = wait_state(kube, "doomed", "Failed")
    assert conditions(failed)["Failed"] == ("True", "DeadlineExceeded")
    assert failed["message"] == "past 3600 s"
    assert ("Warning", "Failed", "past 3600 s") in events(kube, "doomed")


def test_queued_job_waits_for_kueue(kube, user):
    with running(kube):
        submit(user, "queued", cluster={"queue": "team-a"})
        rayjob = kube.wait(lambda: kube.get("rayjobs", NS, "queued"), 10, "the RayJob")
        assert rayjob["spec"]["suspend"] is True
        queued = wait_state(kube, "queued", "Queued")
        assert conditions(queued)["Admitted"] == ("False", "Queued")
        assert "Kueue LocalQueue team-a" in queued["message"]
        # Kueue admits the workload: it unsuspends the RayJob, and KubeRay starts the cluster.
        user.custom.patch_namespaced_custom_object("ray.io", "v1", NS, "rayjobs", "queued", {"spec": {"suspend": False}})
        kube.update_status("rayjobs", NS, "queued", {"jobDeploymentStatus": "Initializing"})
        admitted = kube.wait(lambda: conditions(status_of(kube, "queued")).get("Admitted", ("",))[0] == "True"
                             and status_of(kube, "queued"), 10, "admission")
        assert admitted["state"] == "Pending"
        kube.update_status("rayjobs", NS, "queued", {"jobDeploymentStatus": "Running", "jobStatus": "RUNNING"})
        wait_state(kube, "queued", "Running")
        # Kueue preempts it for a higher-priority workload: it suspends the running RayJob again.
        user.custom.patch_namespaced_custom_object("ray.io", "v1", NS, "rayjobs", "queued", {"spec": {"suspend": True}})
        kube.update_status("rayjobs", NS, "queued", {"jobDeploymentStatus": "Suspended", "jobStatus": ""})
        preempted = wait_state(kube, "queued", "Preempted")
        assert conditions(preempted)["Admitted"] == ("False", "Preempted")
        assert "resumes there once admitted again" in preempted["message"]
        # admitted again: it runs (and resumes from its checkpoint: resume: auto)
        user.custom.patch_namespaced_custom_object("ray.io", "v1", NS, "rayjobs", "queued", {"spec": {"suspend": False}})
        kube.update_status("rayjobs", NS, "queued", {"jobDeploymentStatus": "Running", "jobStatus": "RUNNING"})
        wait_state(kube, "queued", "Running")


def test_delete_cascades_to_what_the_job_owns(kube, user):
    with running(kube):
        submit(user, "gone")
        kube.wait(lambda: kube.get("rayjobs", NS, "gone") and kube.get("configmaps", NS, "gone-job"), 10, "objects")
        assert delete_diffusionjob(user, NS, "gone") is True
        kube.wait(lambda: not kube.objects("rayjobs") and not kube.objects("configmaps"), 10, "the cascade")
        assert delete_diffusionjob(user, NS, "gone") is False


def test_restart_creates_nothing_twice(kube, user):
    with running(kube, "first"):
        submit(user, "kept")
        kube.wait(lambda: status_of(kube, "kept").get("rayJobName"), 10, "the first controller's work")
    with running(kube, "second") as second:
        assert second.elector.wait_for_leadership(second._stop, timeout=10)
        # The new controller acts: it follows the RayJob it did not create...
        kube.update_status("rayjobs", NS, "kept", {"jobDeploymentStatus": "Running", "jobStatus": "RUNNING"})
        wait_state(kube, "kept", "Running")
        # ...and creates what is new.
        submit(user, "new")
        kube.wait(lambda: kube.get("rayjobs", NS, "new"), 10, "the new job's RayJob")
    assert [r["agent"] for r in kube.created("rayjobs")] == ["controller/first", "controller/second"]
    for plural in BESIDE:  # one each per job: the second controller adopted "kept"'s and made only "new"'s
        assert [o["metadata"]["labels"]["sdray.io/job"] for o in kube.objects(plural)] == ["kept", "new"], plural
        assert len(kube.created(plural)) == 2, plural


def test_two_replicas_only_the_leader_acts(kube, user):
    with running(kube, "a") as a, running(kube, "b") as b:
        kube.wait(lambda: a.elector.is_leader or b.elector.is_leader, 10, "a leader")
        leader, other = (a, b) if a.elector.is_leader else (b, a)
        assert not other.elector.is_leader
        submit(user, "one")
        kube.wait(lambda: status_of(kube, "one").get("rayJobName"), 10, "the leader's work")
        writes = [r for r in kube.requests if r["method"] in ("POST", "PUT", "PATCH", "DELETE")
                  and r["plural"] in ("rayjobs", "configmaps", "diffusionjobs", "events")]  # either group
        assert {r["agent"] for r in writes if r["agent"] != "kubectl"} == {f"controller/{leader.config.identity}"}
        # The leader goes away (it gives the Lease up); the other replica takes over and acts.
        leader.stop(timeout=10)
        assert other.elector.wait_for_leadership(other._stop, timeout=10)
        submit(user, "two")
        kube.wait(lambda: kube.get("rayjobs", NS, "two"), 10, "the new leader's work")
    assert kube.created("rayjobs", f"controller/{other.config.identity}")[-1]["path"].endswith("/rayjobs")
    lease = kube.get("leases", NS, "sdray-controller")
    assert lease["spec"]["leaseTransitions"] >= 1


def _started(kube, user, name) -> None:
    """Submit a job and have KubeRay (the test) report its Ray job running."""
    submit(user, name)
    kube.wait(lambda: kube.get("rayjobs", NS, name), 10, "the RayJob")
    kube.update_status("rayjobs", NS, name, {"jobDeploymentStatus": "Running", "jobStatus": "RUNNING"})
    wait_state(kube, name, "Running")


def test_a_spec_change_of_a_running_job_is_refused_with_an_event(kube, user):
    with running(kube):
        _started(kube, user, "steady")
        before = kube.get("rayjobs", NS, "steady")
        user.custom.patch_namespaced_custom_object("sdray.io", "v1alpha1", NS, "diffusionjobs", "steady",
                                                   {"spec": {"train": {"learning_rate": 0.5, "max_steps": 99}}})
        refused = kube.wait(lambda: status_of(kube, "steady").get("refusedGeneration") == 2 and status_of(kube, "steady"),
                            10, "the refusal")
    warning = [m for t, r, m in events(kube, "steady") if r == "SpecChangeRefused"]
    assert len(warning) == 1 and "spec.train.learning_rate, spec.train.max_steps" in warning[0]
    assert warning[0].startswith("generation 2: ")
    # the refused generation was seen (observedGeneration, the conditions' too); the RayJob keeps the first
    assert (refused["observedGeneration"], refused["appliedGeneration"], refused["state"]) == (2, 1, "Running")
    assert {c["observedGeneration"] for c in refused["conditions"]} == {2}
    after = kube.get("rayjobs", NS, "steady")
    assert after["metadata"]["resourceVersion"] == before["metadata"]["resourceVersion"]  # untouched
    assert "max_steps: 20" in kube.get("configmaps", NS, "steady-job")["data"]["job.yaml"]


def test_a_spec_change_before_the_start_makes_the_rayjob_again(kube, user):
    with running(kube):
        submit(user, "waiting", cluster={"queue": "team-a"})
        first = kube.wait(lambda: kube.get("rayjobs", NS, "waiting"), 10, "the RayJob")
        user.custom.patch_namespaced_custom_object("sdray.io", "v1alpha1", NS, "diffusionjobs", "waiting",
                                                   {"spec": {"train": {"max_steps": 99}}})
        second = kube.wait(lambda: (r := kube.get("rayjobs", NS, "waiting")) and r["metadata"]["uid"] !=
                           first["metadata"]["uid"] and r, 10, "the new RayJob")
        kube.wait(lambda: status_of(kube, "waiting").get("observedGeneration") == 2, 10, "generation 2 applied")
    assert second["metadata"]["annotations"][SPEC_HASH] != first["metadata"]["annotations"][SPEC_HASH]
    assert "max_steps: 99" in kube.get("configmaps", NS, "waiting-job")["data"]["job.yaml"]


def test_api_errors_are_retried_with_backoff(kube, user):
    kube.fail("POST", "rayjobs", code=500, times=3)
    with running(kube) as ctl:
        submit(user, "flaky")
        kube.wait(lambda: kube.get("rayjobs", NS, "flaky"), 10, "the RayJob despite three errors")
        assert ctl.metrics.registry.get_sample_value("sdray_controller_reconcile_errors_total") == 3
    tries = [r["at"] for r in kube.requests if r["method"] == "POST" and r["plural"] == "rayjobs"]
    assert len(tries) == 4
    gaps = [b - a for a, b in zip(tries, tries[1:])]
    for gap, delay in zip(gaps, (0.05, 0.1, 0.2)):  # backoff_base · 2^n
        assert gap >= delay * 0.9, gaps
    for plural in BESIDE:  # made on the first try, adopted by the three after it (409), never made again
        assert len(kube.created(plural)) == 1, plural
        assert [r["code"] for r in kube.requests if r["method"] == "POST" and r["plural"] == plural] == [201, 409, 409, 409]


def test_an_expired_watch_lists_again(kube, user):
    with running(kube) as ctl:
        assert ctl.elector.wait_for_leadership(ctl._stop, timeout=10)
        kube.compact()  # every version the watchers hold is now too old: their next watch gets 410 Gone
        kube.wait(lambda: any(r["code"] == 410 and r["plural"] == "diffusionjobs" for r in kube.requests), 10,
                  "a 410 on the DiffusionJob watch")
        submit(user, "after-compaction")
        kube.wait(lambda: kube.get("rayjobs", NS, "after-compaction"), 10, "the RayJob after re-listing")
    gone = next(i for i, r in enumerate(kube.requests) if r["code"] == 410 and r["plural"] == "diffusionjobs")
    assert any(not r["watch"] and r["method"] == "GET" and r["plural"] == "diffusionjobs"
               for r in kube.requests[gone + 1:]), "no list after the 410"


def test_an_invalid_document_fails_without_a_rayjob(kube, user):
    doc = make_job("broken", "s3://o/x", "s3://d/x", train={"learning_rate": -1})
    body = {**doc, "metadata": {"name": "broken", "namespace": NS}}
    with running(kube):
        user.custom.create_namespaced_custom_object("sdray.io", "v1alpha1", NS, "diffusionjobs", body)
        failed = wait_state(kube, "broken", "Failed")
    assert conditions(failed)["Failed"] == ("True", "InvalidSpec")
    assert "spec.train.learning_rate: Input should be greater than 0" in failed["message"]
    assert [r for _, r, _ in events(kube, "broken")] == ["InvalidSpec"]
    assert kube.objects("rayjobs") == []


def test_a_refused_document_runs_once_it_is_fixed(kube, user):
    doc = make_job("fixed", "s3://o/x", "s3://d/x", train={"learning_rate": -1})
    with running(kube):
        user.custom.create_namespaced_custom_object("sdray.io", "v1alpha1", NS, "diffusionjobs",
                                                    {**doc, "metadata": {"name": "fixed", "namespace": NS}})
        wait_state(kube, "fixed", "Failed")
        user.custom.patch_namespaced_custom_object("sdray.io", "v1alpha1", NS, "diffusionjobs", "fixed",
                                                   {"spec": {"train": {"learning_rate": 1e-4}}})
        kube.wait(lambda: kube.get("rayjobs", NS, "fixed"), 10, "the RayJob of the fixed document")
        status = wait_state(kube, "fixed", "Pending")
    assert "completionTime" not in status and status["observedGeneration"] == 2
    assert conditions(status)["Failed"][0] == "False"


def test_a_foreign_rayjob_of_the_same_name_is_not_taken(kube, user):
    foreign = {"apiVersion": "ray.io/v1", "kind": "RayJob", "metadata": {"name": "taken", "namespace": NS},
               "spec": {"entrypoint": "python other.py"}}
    user.custom.create_namespaced_custom_object("ray.io", "v1", NS, "rayjobs", foreign)
    with running(kube):
        submit(user, "taken")
        failed = wait_state(kube, "taken", "Failed")
    assert conditions(failed)["Failed"] == ("True", "NameConflict")
    assert kube.get("rayjobs", NS, "taken")["spec"]["entrypoint"] == "python other.py"


def test_the_driver_reports_step_and_loss_beside_the_controller(kube, user):
    with running(kube):
        submit(user, "reporting")
        kube.wait(lambda: kube.get("rayjobs", NS, "reporting"), 10, "the RayJob")
        reporter = StatusReporter(user, NS, "reporting", min_interval_s=3600)
        reporter({"step": 10, "loss": 0.25})
        reporter({"step": 20, "loss": 0.2})  # within the interval: not sent
        kube.update_status("rayjobs", NS, "reporting", {"jobDeploymentStatus": "Running", "jobStatus": "RUNNING"})
        status = wait_state(kube, "reporting", "Running")
        assert (status["step"], status["loss"]) == (10, 0.25)  # the controller's patches leave them be
        reporter({"step": 30, "loss": float("nan")}, final=True)
        kube.wait(lambda: status_of(kube, "reporting").get("step") == 30, 10, "the final report")
    missing = StatusReporter(user, NS, "no-such-job")
    missing({"step": 1, "loss": 1.0}, final=True)  # 404: logged once, then silent; never raises
    assert missing._disabled


def test_the_reporter_is_configured_by_the_rendered_environment(kube, user, tmp_path, monkeypatch):
    submit(user, "env-job")
    for name in ("SDRAY_DIFFUSIONJOB", "SDRAY_NAMESPACE", "KUBERNETES_SERVICE_HOST"):
        monkeypatch.delenv(name, raising=False)
    assert StatusReporter.from_env() is None  # not in a RayJob: nothing to report to
    monkeypatch.setenv("KUBECONFIG", str(write_kubeconfig(tmp_path / "kubeconfig", kube.url)))
    monkeypatch.setenv("SDRAY_DIFFUSIONJOB", "env-job")  # what the head pod gets (sdray/k8s/render.py)
    monkeypatch.setenv("SDRAY_NAMESPACE", NS)
    reporter = StatusReporter.from_env()
    reporter({"step": 7, "loss": 1.5, "images_per_s": 12.0})
    reporter.close()
    assert (status_of(kube, "env-job")["step"], status_of(kube, "env-job")["loss"]) == (7, 1.5)


def test_work_queue_holds_each_key_once_and_backs_off():
    import threading

    queue, stop = WorkQueue(base=10.0, cap=40.0), threading.Event()
    queue.add("a")
    queue.add("a")
    assert queue.get(stop, timeout=1) == "a"
    assert queue.get(stop, timeout=0.01) is None  # held once, and "a" is being worked on
    queue.add("a")  # changed while being worked on: comes back after done
    queue.done("a")
    assert queue.get(stop, timeout=1) == "a"
    assert [queue.retry("a") for _ in range(4)] == [10.0, 20.0, 40.0, 40.0]
    queue.forget("a")
    assert queue.failures("a") == 0


def test_changed_paths():
    old = {"train": {"learning_rate": 1e-4, "max_steps": 10}, "data": {"uri": "s3://a"}}
    new = {"train": {"learning_rate": 1e-3, "max_steps": 10}, "data": {"uri": "s3://a"}, "cluster": {"queue": "q"}}
    assert changed_paths(old, new) == ["spec.cluster", "spec.train.learning_rate"]


def test_connect_refuses_an_unreachable_server():
    clients = Clients.connect(host="http://127.0.0.1:9")
    with pytest.raises(Exception) as err:  # urllib3's MaxRetryError: nothing listens on the discard port
        clients.custom.list_cluster_custom_object("sdray.io", "v1alpha1", "diffusionjobs", _request_timeout=2)
    assert not isinstance(err.value, ApiException)


def test_controller_command_runs_until_sigterm_and_gives_the_lease_up(kube, user, tmp_path):
    import os
    import signal
    import socket
    import subprocess
    import sys
    import urllib.request

    kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", kube.url)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k not in ("KUBERNETES_SERVICE_HOST", "POD_NAMESPACE")}
    # The pod defaults as the chart writes them (values jobPods), and a claim it lets documents mount.
    [defaults] = [o for o in chart_objects(NS, {"jobPods": {"schedulerName": "volcano", "labels": {"cost": "ml"}}})
                  if o["kind"] == "ConfigMap" and o["metadata"]["name"] == "sdray-pod-defaults"]
    (tmp_path / "pod-defaults.yaml").write_text(defaults["data"]["pod-defaults.yaml"])
    proc = subprocess.Popen([sys.executable, "-m", "sdray.cli", "controller", "-n", NS, "--kubeconfig", str(kubeconfig),
                             "--health-port", str(port), "--image", "img:2", "--allow-volume-claim", "team-a-data",
                             "--pod-defaults", str(tmp_path / "pod-defaults.yaml")],
                            env=env, stderr=subprocess.PIPE, text=True)
    try:
        submit(user, "from-cli", cluster={"volumes": [{"name": "d", "mount_path": "/data",
                                                       "persistent_volume_claim": "team-a-data"}]})
        rayjob = kube.wait(lambda: kube.get("rayjobs", NS, "from-cli"), 30, "the CLI controller's RayJob")
        head = rayjob["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]
        assert head["spec"]["containers"][0]["image"] == "img:2"
        assert head["spec"]["schedulerName"] == "volcano" and head["metadata"]["labels"]["cost"] == "ml"
        assert {"name": "vol-d", "persistentVolumeClaim": {"claimName": "team-a-data", "readOnly": True}} in head[
            "spec"]["volumes"]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as response:
            assert response.status == 200
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            assert "sdray_controller_leader 1" in response.read().decode()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert kube.get("leases", NS, "sdray-controller")["spec"]["holderIdentity"] == ""  # handed over at once


class _Killed(Exception):
    """Raised where a test kills the controller mid-reconcile."""


def _kill_at(ctl, method: str) -> None:
    """Kill ``ctl`` when its reconcile reaches ``method``, as SIGKILL would: no write of that step or any
    after it, and the Lease is not given up (the next controller waits for it to expire)."""
    def killed(*args, **kwargs):
        ctl.elector.release = lambda: None
        ctl.request_stop()
        raise _Killed(method)
    setattr(ctl, method, killed)


@pytest.mark.parametrize("point", ["_create_rayjob", "_patch_status"])
def test_a_controller_killed_mid_reconcile_is_replaced_without_a_second_rayjob(kube, user, point):
    """Killed after the job's ConfigMap and identity but before its RayJob, or after the RayJob but before
    the DiffusionJob's status says so: a new controller finds what exists by name and ownership and makes
    only what is missing, and the status converges."""
    with running(kube, "first") as first:
        _kill_at(first, point)
        submit(user, "crashy")
        kube.wait(lambda: not first._threads[1].is_alive(), 10, "the first controller to die mid-reconcile")
    assert status_of(kube, "crashy").get("rayJobName") is None  # its status never said what it made
    made_first = len(kube.created("rayjobs"))
    assert made_first == (1 if point == "_patch_status" else 0)
    with running(kube, "second") as second:
        assert second.elector.wait_for_leadership(second._stop, timeout=10)
        status = kube.wait(lambda: status_of(kube, "crashy").get("rayJobName") == "crashy" and status_of(kube, "crashy"),
                           10, "the second controller to converge")
    assert status["state"] == "Pending" and status["observedGeneration"] == 1
    assert [r["agent"] for r in kube.created("rayjobs")] == ["controller/first" if made_first else "controller/second"]
    assert [r["metadata"]["name"] for r in kube.objects("rayjobs")] == ["crashy"]
    for plural in BESIDE:  # made once, by the first controller; the second adopted them (409) or left them be
        assert len(kube.objects(plural)) == 1, plural
        assert [r["agent"] for r in kube.created(plural)] == ["controller/first"], plural
    check_store(kube)


def test_every_spec_change_seen_advances_observed_generation_refused_ones_too(kube, user):
    with running(kube):
        _started(kube, user, "gens")
        for generation, change in ((2, {"train": {"max_steps": 30}}), (3, {"train": {"learning_rate": -1}})):
            user.custom.patch_namespaced_custom_object("sdray.io", "v1alpha1", NS, "diffusionjobs", "gens",
                                                       {"spec": change})
            seen = kube.wait(lambda: status_of(kube, "gens").get("observedGeneration") == generation  # noqa: B023
                             and status_of(kube, "gens"), 10, f"generation {generation} seen")
            assert (seen["refusedGeneration"], seen["appliedGeneration"], seen["state"]) == (generation, 1, "Running")
    assert kube.get("diffusionjobs", NS, "gens")["metadata"]["generation"] == 3
    notes = [n for _, r, n in events(kube, "gens") if r == "SpecChangeRefused"]
    assert [n.split(":")[0] for n in notes] == ["generation 2", "generation 3"]
    assert "spec.train.learning_rate: Input should be greater than 0" in notes[1]  # an invalid change: refused too


def test_events_are_events_k8s_io_v1_and_a_repeat_counts_up_its_series(kube, user):
    with running(kube, "events-a") as ctl:
        dj = submit(user, "evented")
        kube.wait(lambda: events(kube, "evented"), 10, "the first Event")
        stored = kube.get("diffusionjobs", NS, "evented")
        ctl._event(stored, "Warning", "Probe", "the same note twice", action="Check")
        ctl._event(stored, "Warning", "Probe", "the same note twice", action="Check")
    assert kube.objects("events", NS) == kube.objects("events.events.k8s.io", NS)  # none of core/v1
    created = next(e for e in kube.objects("events.events.k8s.io", NS) if e["reason"] == "Created")
    assert (created["apiVersion"], created["action"], created["type"]) == ("events.k8s.io/v1", "CreateRayJob", "Normal")
    assert created["regarding"] == {"apiVersion": "sdray.io/v1alpha1", "kind": "DiffusionJob", "name": "evented",
                                    "namespace": NS, "uid": dj["metadata"]["uid"],
                                    "resourceVersion": created["regarding"]["resourceVersion"]}
    assert (created["reportingController"], created["reportingInstance"]) == ("sdray.io/controller", "events-a")
    assert datetime.fromisoformat(created["eventTime"]).utcoffset() == timedelta(0)  # a MicroTime, in UTC
    probes = [e for e in kube.objects("events.events.k8s.io", NS) if e["reason"] == "Probe"]
    assert len(probes) == 1 and probes[0]["series"]["count"] == 2  # patched, not recorded twice
    patches = [r for r in kube.requests if r["method"] == "PATCH" and r["plural"] == "events"]
    assert patches and all(r["path"].startswith("/apis/events.k8s.io/v1/") for r in patches)
    check_store(kube)  # every stored Event passes the events.k8s.io/v1 schema
