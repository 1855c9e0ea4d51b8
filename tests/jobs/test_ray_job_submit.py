"""`ray job submit` of jobs.corpus to a local head (dashboard + job server) started by this test,
reading videos from and writing Parquet to a moto S3 server. Stops only the processes it started."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from pyarrow import fs

from pipeline.samples import make_video
from tests.pipeline.s3server import FAKE_ENV, boto_client, fake_aws_env, moto_server

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).parent / "ray")


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def test_ray_job_submit_corpus_against_s3(tmp_path, tiny_model):
    # the venv's python for the job's entrypoint and workers (on a cluster: the image's `python`)
    env = {**os.environ, "RAY_AUTH_MODE": "disabled",
           "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")}
    env.pop("RAY_ADDRESS", None)
    gcs, dash, client, agent, agent_grpc, metrics, rt_env = _free_ports(7)
    temp_dir = tempfile.mkdtemp(prefix="rjs", dir="/tmp")  # short: Ray's socket paths must stay < 108 chars
    head = subprocess.Popen(
        [RAY, "start", "--head", "--block", f"--port={gcs}", f"--dashboard-port={dash}", "--num-cpus=2",
         "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--ray-client-server-port={client}",
         f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
         f"--metrics-export-port={metrics}", f"--runtime-env-agent-port={rt_env}", f"--temp-dir={temp_dir}",
         "--disable-usage-stats"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                with urllib.request.urlopen(address + "/api/version", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert head.poll() is None, head.stdout.read()[-3000:]
            assert time.time() < deadline, "dashboard did not come up"
            time.sleep(1)

        with fake_aws_env(), moto_server() as endpoint:
            s3 = boto_client(endpoint)
            s3.create_bucket(Bucket="jobs")
            for i in range(2):
                s3.put_object(Bucket="jobs", Key=f"videos/v{i}.mp4",
                              Body=make_video(num_frames=6 + i, width=32, height=32, fps=8))
            cfg = tmp_path / "job.yaml"
            cfg.write_text(f"""
run_id: submitted
input: {{s3_prefix: s3://jobs/videos/}}
output: {{path: s3://jobs/out}}
model: {{source: {tiny_model}}}
decode: {{num_frames: 4}}
tasks: {{caption_prompt: Describe., max_new_tokens: 3}}
stages: {{decode_num_cpus: 0.5, actor_num_cpus: 0.5, decode_memory_gb: 0.25}}
ray: {{progress_bars: false}}
""")
            runtime_env = {"env_vars": {**FAKE_ENV, "AWS_ENDPOINT_URL": endpoint}}
            sub = subprocess.run(
                [RAY, "job", "submit", "--address", address, "--submission-id", "corpus-test", "--working-dir", ".",
                 "--runtime-env-json", json.dumps(runtime_env), "--", sys.executable, "-m", "jobs.corpus",
                 "--config", str(cfg)],
                cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
            status = subprocess.run([RAY, "job", "status", "--address", address, "corpus-test"], env=env,
                                    capture_output=True, text=True, timeout=60)
            assert sub.returncode == 0 and "job 'corpus-test' succeeded" in (status.stdout + status.stderr).lower(), (sub.stdout[-4000:], sub.stderr[-2000:], status.stdout)
            assert "videos         2   ok 2" in sub.stdout, sub.stdout[-3000:]

            s3fs = fs.S3FileSystem(endpoint_override=endpoint.split("://")[1], scheme="http", region="us-east-1")
            files = [i.path for i in s3fs.get_file_info(fs.FileSelector("jobs/out/submitted")) if i.path.endswith(".parquet")]
            rows = [r for f in files for r in pq.read_table(f, filesystem=s3fs).to_pylist()]
            assert sorted(r["video_uri"] for r in rows) == ["s3://jobs/videos/v0.mp4", "s3://jobs/videos/v1.mp4"]
            assert {r["status"] for r in rows} == {"ok"} and {r["task_id"] for r in rows} == {"caption"}
    finally:
        if head.poll() is None:
            head.send_signal(signal.SIGTERM)  # `ray start --block` stops its processes on SIGTERM
            try:
                head.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(head.pid, signal.SIGKILL)  # whatever of OUR session is left (raylet, workers)
        except ProcessLookupError:
            pass
        head.wait(timeout=30)
