"""Ray Jobs: run a launch's driver on the cluster's head node, follow its logs, stop it.

The address is Ray's dashboard (``http://HEAD:8265``), given or taken from ``RAY_API_SERVER_ADDRESS`` /
``RAY_ADDRESS`` as Ray's own CLI does. With token authentication on, Ray's client adds the token from
``RAY_AUTH_TOKEN`` or the token file itself (``RAY_AUTH_MODE=token``); raylm never takes one as an argument.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import sys
from typing import List, Optional

from raylm.errors import UserError, first_line


def _address(address: Optional[str]) -> str:
    chosen = address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS")
    if not chosen:
        raise UserError("no Ray Jobs address: give --address http://HEAD:8265 (the head's dashboard) or set RAY_ADDRESS")
    return chosen


def client(address: Optional[str]):
    """A ``JobSubmissionClient`` for the cluster, or a one-line error naming the address and the fix."""
    from ray.job_submission import JobSubmissionClient

    chosen = _address(address)
    try:
        return JobSubmissionClient(chosen)
    except Exception as err:  # connection refused, HTTP 401, a non-Ray server: all say the same to the user
        reason = first_line(err)
        auth = " (with token authentication on, set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN or the token file)" if "401" in reason or "uthenticat" in reason else ""
        raise UserError(f"cannot reach Ray Jobs at --address {chosen}: {reason[:200]}{auth}; check the head's dashboard address and port") from None


def submit(address: Optional[str], launch_args: List[str], submission_id: str, working_dir: str) -> str:
    """Submit ``raylm launch <launch_args>`` as a Ray Job run in (a copy of) ``working_dir``; returns the job id.

    Nothing but files goes into the runtime_env: secrets there show on the dashboard, so the driver takes its
    W&B key and storage credentials from the head node's environment, as workers do from theirs.
    """
    entrypoint = shlex.join(["raylm", "launch", *launch_args])
    jobs = client(address)
    try:
        return jobs.submit_job(entrypoint=entrypoint, submission_id=submission_id, runtime_env={"working_dir": working_dir})
    except RuntimeError as err:
        raise UserError(f"Ray refused the job {submission_id}: {first_line(err)[:300]}") from None


def _known(jobs, job_id: str) -> None:
    try:
        jobs.get_job_status(job_id)
    except RuntimeError:
        raise UserError(f"no Ray job '{job_id}' on this cluster; 'ray job list' shows the jobs it knows") from None


def print_logs(address: Optional[str], job_id: str, follow: bool) -> str:
    """Print the job's driver output (until it ends with ``follow``); returns its status."""
    jobs = client(address)
    _known(jobs, job_id)
    if not follow:
        sys.stdout.write(jobs.get_job_logs(job_id))
        sys.stdout.flush()
        return str(jobs.get_job_status(job_id).value)

    async def tail() -> None:
        async for lines in jobs.tail_job_logs(job_id):
            sys.stdout.write(lines)
            sys.stdout.flush()

    asyncio.run(tail())
    return str(jobs.get_job_status(job_id).value)


def stop(address: Optional[str], job_id: str) -> bool:
    """Ask Ray to stop the job (SIGTERM to its driver, then SIGKILL); False if it had already ended."""
    jobs = client(address)
    _known(jobs, job_id)
    return bool(jobs.stop_job(job_id))
