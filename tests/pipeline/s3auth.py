"""An S3 API that enforces IAM: moto's server in its auth mode, as a separate process.

moto checks signatures and IAM policies once ``moto.settings.INITIAL_NO_AUTH_ACTION_COUNT`` authenticated
actions have been served unauthenticated (the setting is read from the environment variable of that name
when moto is imported; default: infinite, i.e. never). The server's ``POST /moto-api/reset-auth`` sets the
same setting at run time and zeroes the counter. :func:`iam_enforcing_s3` starts ``python -m moto.server``
in its own process (so the in-process ``mock_aws`` used by the rest of the suite is untouched), does the
setup unauthenticated, then switches auth on with ``reset-auth`` ``0``: from then on every request needs a
valid signature by an access key that exists in moto's IAM and a policy allowing the action on the
resource. (Switching by request rather than by counting setup actions in the environment variable keeps
the setup free to change, and a retried setup request cannot leave auth off.)

Setup: bucket :data:`BUCKET` with a readable video (:data:`READABLE_KEY`) and a forbidden one
(:data:`FORBIDDEN_KEY`), bucket :data:`UNLISTABLE_BUCKET` with one video, and IAM user :data:`USER` whose
only (inline) policy allows ``s3:GetObject`` on the readable key and ``s3:ListBucket`` on :data:`BUCKET`.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from typing import NamedTuple

BUCKET = "restricted"
READABLE_KEY = "videos/readable.mp4"
FORBIDDEN_KEY = "videos/forbidden.mp4"
UNLISTABLE_BUCKET = "unlistable"
UNLISTABLE_KEY = "videos/other.mp4"
USER = "pipeline-reader"

POLICY = {
    "Version": "2012-10-17",
    "Statement": [
        {"Effect": "Allow", "Action": "s3:GetObject", "Resource": f"arn:aws:s3:::{BUCKET}/{READABLE_KEY}"},
        {"Effect": "Allow", "Action": "s3:ListBucket", "Resource": f"arn:aws:s3:::{BUCKET}"},
    ],
}

# any credentials do for the unauthenticated setup (moto checks nothing yet)
_SETUP_CREDENTIALS = {"aws_access_key_id": "setup", "aws_secret_access_key": "setup", "region_name": "us-east-1"}


class Restricted(NamedTuple):
    endpoint: str
    access_key_id: str
    secret_access_key: str


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_until_up(endpoint: str, proc: subprocess.Popen, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"moto server exited with code {proc.returncode} before answering")
        try:  # /moto-api/ is not an AWS action: it does not count towards INITIAL_NO_AUTH_ACTION_COUNT
            with urllib.request.urlopen(f"{endpoint}/moto-api/data.json", timeout=2):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"moto server at {endpoint} did not answer within {timeout_s} s") from None
            time.sleep(0.1)


def _enable_auth(endpoint: str) -> None:
    req = urllib.request.Request(f"{endpoint}/moto-api/reset-auth", data=b"0", method="POST",
                                 headers={"Content-Type": "text/plain"})  # not form-encoded: moto reads the raw body
    with urllib.request.urlopen(req, timeout=10) as resp:
        body = json.loads(resp.read())
    if body.get("status") != "ok":
        raise RuntimeError(f"moto did not switch auth on: {body}")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGTERM)  # moto.server exits 0 on SIGTERM
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()


@contextlib.contextmanager
def iam_enforcing_s3():
    """Yield :class:`Restricted` ``(endpoint, access_key_id, secret_access_key)`` of :data:`USER` on a moto
    server that enforces IAM policies; the server process is stopped (by pid) on exit."""
    import boto3

    from tests.pipeline.videos import make_video

    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env["INITIAL_NO_AUTH_ACTION_COUNT"] = "inf"  # explicit: unauthenticated until _enable_auth
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_until_up(endpoint, proc)
        s3c = boto3.client("s3", endpoint_url=endpoint, **_SETUP_CREDENTIALS)
        iam = boto3.client("iam", endpoint_url=endpoint, **_SETUP_CREDENTIALS)
        video = make_video(num_frames=8, width=32, height=32, fps=8)
        s3c.create_bucket(Bucket=BUCKET)
        s3c.put_object(Bucket=BUCKET, Key=READABLE_KEY, Body=video)
        s3c.put_object(Bucket=BUCKET, Key=FORBIDDEN_KEY, Body=video)
        s3c.create_bucket(Bucket=UNLISTABLE_BUCKET)
        s3c.put_object(Bucket=UNLISTABLE_BUCKET, Key=UNLISTABLE_KEY, Body=video)
        iam.create_user(UserName=USER)
        iam.put_user_policy(UserName=USER, PolicyName="read-one-video", PolicyDocument=json.dumps(POLICY))
        key = iam.create_access_key(UserName=USER)["AccessKey"]
        _enable_auth(endpoint)
        yield Restricted(endpoint, key["AccessKeyId"], key["SecretAccessKey"])
    finally:
        _stop(proc)
