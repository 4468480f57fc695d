"""One set of job states (sdray/states.py): the REST API, the CRD, the kuberay backend and the job store say
the same strings, and what was written before (lower case) is still read."""

from __future__ import annotations

import sqlite3

import pytest

from sdray.k8s.crd import crd
from sdray.service.store import SCHEMA, JobStore
from sdray.service.views import JobView
from sdray.states import FINAL, STATES, JobState, parse_state


def test_rest_and_crd_take_their_states_from_one_definition():
    assert STATES == ("Queued", "Pending", "Running", "Succeeded", "Failed", "Cancelled", "Preempted")
    status = crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"]
    assert status["state"]["enum"] == list(STATES)
    view = JobView.model_json_schema()
    assert view["$defs"]["JobState"]["enum"] == list(STATES)  # what the OpenAPI document shows for `state`


@pytest.mark.parametrize("text", ["running", "Running", "RUNNING"])
def test_states_are_read_in_any_case(text):
    assert parse_state(text) is JobState.RUNNING


def test_an_unknown_state_names_the_states():
    with pytest.raises(ValueError, match="expected one of Queued, Pending, Running, Succeeded, Failed, Cancelled, "
                                         "Preempted, got 'done'"):
        parse_state("done")


def test_a_store_written_before_is_read_in_the_new_states(tmp_path):
    path = tmp_path / "old.db"
    db = sqlite3.connect(path)
    db.executescript(SCHEMA)
    rows = [("q", 1, "pending", None), ("p", 2, "pending", "dry-1"), ("r", 3, "running", "dry-2"),
            ("s", 4, "succeeded", "dry-3"), ("x", 5, "preempted", "dry-4"), ("c", 6, "cancelled", None)]
    for job_id, seq, state, handle in rows:
        db.execute("INSERT INTO jobs (id, seq, tenant, name, kind, state, labels, document, demand, handle, "
                   "progress_token_hash, created, updated) VALUES (?, ?, 't', 'n', 'train', ?, '{}', '{}', "
                   "'{\"workers\": 1}', ?, '', 0, 0)", (job_id, seq, state, handle))
    db.commit()
    db.close()
    store = JobStore(path)
    assert {r.id: r.state for r in store.list()} == {"q": "Queued", "p": "Pending", "r": "Running", "s": "Succeeded",
                                                     "x": "Preempted", "c": "Cancelled"}
    assert store.queue_depth() == {"t": 1} and store.active_usage("t")[0] == 3
    assert {"Succeeded", "Preempted", "Cancelled"} <= FINAL
