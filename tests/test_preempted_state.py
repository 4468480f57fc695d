"""How a preempted run reads in the service: a driver that ended with status 3 stopped at a checkpoint."""

from ray.job_submission import JobInfo, JobStatus

from sdray.service.backends.local import job_state


def test_a_driver_that_exits_3_is_preempted_not_failed():
    ended = dict(entrypoint="python -m sdray.service.runner")
    assert job_state(JobInfo(status=JobStatus.FAILED, driver_exit_code=3, **ended)) == "Preempted"
    assert job_state(JobInfo(status=JobStatus.FAILED, driver_exit_code=1, **ended)) == "Failed"
    assert job_state(JobInfo(status=JobStatus.SUCCEEDED, driver_exit_code=0, **ended)) == "Succeeded"
    assert job_state(JobInfo(status=JobStatus.STOPPED, **ended)) == "Cancelled"
