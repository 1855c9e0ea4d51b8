"""KubeRay manifests, the Dockerfile, the IAM policy and the infra README: structure and consistency.

No Kubernetes cluster, Docker daemon or AWS account is needed: the files are parsed and cross-checked
against each other (one image everywhere, one Ray version, entry points that exist, config files that
are mounted where the entry points look for them, S3 locations the IAM policy allows).
"""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
KUBERAY = INFRA / "kuberay"
DOCKERFILE = INFRA / "Dockerfile"
IAM_POLICY = INFRA / "iam-policy.json"

MANIFEST_KINDS = {
    "raycluster.yaml": {"RayCluster"},
    "rayjob-corpus.yaml": {"RayJob", "ConfigMap"},
    "nightly-cronjob.yaml": {"RayCronJob", "ConfigMap"},
}
EXPECTED_ENTRYPOINTS = {"rayjob-corpus.yaml": "jobs.corpus", "nightly-cronjob.yaml": "jobs.nightly"}
SECRET_NAMES = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "HF_TOKEN",
    "HUGGING_FACE_HUB_TOKEN",
)


def _load(name: str) -> list[dict]:
    return [doc for doc in yaml.safe_load_all((KUBERAY / name).read_text()) if doc is not None]


def _docs() -> list[tuple[str, dict]]:
    return [(name, doc) for name in MANIFEST_KINDS for doc in _load(name)]


def _ray_docs() -> list[tuple[str, dict]]:
    return [(name, doc) for name, doc in _docs() if doc["apiVersion"].startswith("ray.io/")]


def _job_spec(doc: dict) -> dict | None:
    """The RayJob spec of a RayJob, or the template of a RayCronJob; None for a RayCluster."""
    if doc["kind"] == "RayJob":
        return doc["spec"]
    if doc["kind"] == "RayCronJob":
        return doc["spec"]["jobTemplate"]
    return None


def _cluster_spec(doc: dict) -> dict:
    job = _job_spec(doc)
    return doc["spec"] if job is None else job["rayClusterSpec"]


def _pod_specs(cluster_spec: dict) -> list[tuple[str, dict]]:
    pods = [("head", cluster_spec["headGroupSpec"]["template"]["spec"])]
    pods += [(g["groupName"], g["template"]["spec"]) for g in cluster_spec.get("workerGroupSpecs", [])]
    return pods


def _gpu_limit(container: dict) -> int:
    return int(container.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0))


def _entrypoint(doc: dict) -> list[str]:
    return shlex.split(_job_spec(doc)["entrypoint"])


def _module_of(argv: list[str]) -> str:
    assert argv[:2] == ["python", "-m"], f"entrypoint must be `python -m jobs.<name> ...`, got {argv}"
    return argv[2]


def _config_path(argv: list[str]) -> str:
    assert "--config" in argv, f"entrypoint must pass --config: {argv}"
    return argv[argv.index("--config") + 1]


def _cluster_image() -> str:
    return yaml.safe_load((ROOT / "ray_cluster.yaml").read_text())["docker"]["image"]


def _dockerfile_base_image() -> str:
    text = DOCKERFILE.read_text()
    args = dict(re.findall(r"^ARG\s+(\w+)=(\S+)\s*$", text, flags=re.M))
    froms = re.findall(r"^FROM\s+(\S+)", text, flags=re.M)
    assert froms, "Dockerfile has no FROM"
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args[m.group(1) or m.group(2)], froms[-1])


def _dockerfile_ray_version() -> str:
    base = _dockerfile_base_image()
    match = re.fullmatch(r"(?:docker\.io/)?rayproject/ray(?:-ml)?:(\d+\.\d+\.\d+)(?:-\S+)?", base)
    assert match, f"base image should be a versioned rayproject/ray image, got {base}"
    return match.group(1)


# --- cron -----------------------------------------------------------------------------------------

_CRON_FIELDS = [  # (low, high, names)
    (0, 59, {}),
    (0, 23, {}),
    (1, 31, {}),
    (1, 12, {m: i + 1 for i, m in enumerate("JAN FEB MAR APR MAY JUN JUL AUG SEP OCT NOV DEC".split())}),
    (0, 7, {d: i for i, d in enumerate("SUN MON TUE WED THU FRI SAT".split())}),
]


def is_valid_cron(expr: str) -> bool:
    """A standard 5-field cron expression (what Kubernetes CronJob and KubeRay RayCronJob accept)."""
    fields = expr.split()
    if len(fields) != 5:
        return False

    def value(token: str, low: int, high: int, names: dict) -> int | None:
        v = names.get(token.upper()) if not token.isdigit() else int(token)
        return v if v is not None and low <= v <= high else None

    for field, (low, high, names) in zip(fields, _CRON_FIELDS):
        for item in field.split(","):
            base, _, step = item.partition("/")
            if step and (not step.isdigit() or int(step) == 0):
                return False
            if base in ("*", "?"):
                continue
            lo_tok, dash, hi_tok = base.partition("-")
            lo = value(lo_tok, low, high, names)
            hi = value(hi_tok, low, high, names) if dash else lo
            if lo is None or hi is None or lo > hi:
                return False
    return True


@pytest.mark.parametrize(
    "expr", ["0 2 * * *", "*/15 * * * *", "30 1 * * MON-FRI", "0 0 1,15 * *", "5 4 * JAN 0"]
)
def test_cron_validator_accepts(expr):
    assert is_valid_cron(expr)


@pytest.mark.parametrize(
    "expr", ["0 2 * *", "60 * * * *", "0 24 * * *", "* * 0 * *", "*/0 * * * *", "@daily", "a b c d e"]
)
def test_cron_validator_rejects(expr):
    assert not is_valid_cron(expr)


# --- manifests: structure -------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(MANIFEST_KINDS))
def test_manifest_parses_with_required_fields(name):
    docs = _load(name)
    assert {d["kind"] for d in docs} == MANIFEST_KINDS[name]
    for doc in docs:
        assert doc.get("apiVersion"), f"{name}: document without apiVersion"
        assert doc.get("metadata", {}).get("name"), f"{name}: {doc['kind']} without metadata.name"
        if doc["kind"] == "ConfigMap":
            assert doc["apiVersion"] == "v1" and doc.get("data")
        else:
            assert doc["apiVersion"] == "ray.io/v1", f"{name}: KubeRay resources use ray.io/v1"
            assert isinstance(doc.get("spec"), dict)


@pytest.mark.parametrize("name,doc", _ray_docs(), ids=[n for n, _ in _ray_docs()])
def test_cluster_spec_shape(name, doc):
    spec = _cluster_spec(doc)
    head = spec["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict)
    assert head["rayStartParams"].get("num-cpus") == "0", f"{name}: nothing may be scheduled on the head"
    assert spec.get("enableInTreeAutoscaling") is True
    groups = spec.get("workerGroupSpecs", [])
    assert {g["groupName"] for g in groups} >= {"cpu-decode"}
    for g in groups:
        assert isinstance(g["rayStartParams"], dict)
        assert 0 <= g["minReplicas"] <= g.get("replicas", 0) <= g["maxReplicas"], f"{name}/{g['groupName']}"
    for group, pod in _pod_specs(spec):
        assert pod["containers"], f"{name}/{group}: no container"
        assert pod.get("serviceAccountName") == "dycoke-pipeline", (
            f"{name}/{group}: S3 access comes from the SA"
        )


@pytest.mark.parametrize("name,doc", _ray_docs(), ids=[n for n, _ in _ray_docs()])
def test_images_match_ray_cluster_yaml(name, doc):
    image = _cluster_image()
    for group, pod in _pod_specs(_cluster_spec(doc)):
        for container in pod["containers"]:
            assert container["image"] == image, f"{name}/{group}: image differs from ray_cluster.yaml"


@pytest.mark.parametrize("name,doc", _ray_docs(), ids=[n for n, _ in _ray_docs()])
def test_ray_version_matches_dockerfile(name, doc):
    assert _cluster_spec(doc)["rayVersion"] == _dockerfile_ray_version()


@pytest.mark.parametrize("name,doc", _ray_docs(), ids=[n for n, _ in _ray_docs()])
def test_gpu_groups_request_gpus(name, doc):
    spec = _cluster_spec(doc)
    gpu_groups = 0
    for group, pod in _pod_specs(spec):
        gpus = sum(_gpu_limit(c) for c in pod["containers"])
        if "gpu" in group:
            gpu_groups += 1
            assert gpus >= 1, f"{name}/{group}: GPU group without nvidia.com/gpu limits"
            for c in pod["containers"]:
                requests = c.get("resources", {}).get("requests", {})
                if "nvidia.com/gpu" in requests:  # extended resources: requests must equal limits
                    assert int(requests["nvidia.com/gpu"]) == _gpu_limit(c)
        else:
            assert gpus == 0, f"{name}/{group}: only GPU groups may hold GPUs"
    assert gpu_groups >= 1, f"{name}: no GPU worker group"


def test_standing_cluster_has_small_and_large_gpu_groups():
    (doc,) = _load("raycluster.yaml")
    gpus = {g: sum(_gpu_limit(c) for c in pod["containers"]) for g, pod in _pod_specs(doc["spec"])}
    assert 1 in gpus.values(), "need a 1-GPU group (0.5B / 7B)"
    assert 8 in gpus.values(), "need an 8-GPU group (72B)"


# --- jobs -----------------------------------------------------------------------------------------


def _job_docs() -> list[tuple[str, dict]]:
    return [(n, d) for n, d in _ray_docs() if _job_spec(d) is not None]


@pytest.mark.parametrize("name,doc", _job_docs(), ids=[n for n, _ in _job_docs()])
def test_job_lifecycle_and_entrypoint(name, doc):
    job = _job_spec(doc)
    assert _module_of(_entrypoint(doc)) == EXPECTED_ENTRYPOINTS[name]
    assert job["shutdownAfterJobFinishes"] is True
    assert isinstance(job["ttlSecondsAfterFinished"], int) and job["ttlSecondsAfterFinished"] >= 0


def test_nightly_schedule_is_valid_cron():
    (cron,) = [d for d in _load("nightly-cronjob.yaml") if d["kind"] == "RayCronJob"]
    assert is_valid_cron(cron["spec"]["schedule"]), cron["spec"]["schedule"]


@pytest.mark.parametrize("name,doc", _job_docs(), ids=[n for n, _ in _job_docs()])
def test_config_file_is_mounted_on_head(name, doc):
    """--config points into a ConfigMap volume of the head pod (where the driver runs), and the
    ConfigMap in the same file has that key."""
    path = Path(_config_path(_entrypoint(doc)))
    head = _cluster_spec(doc)["headGroupSpec"]["template"]["spec"]
    volumes = {v["name"]: v for v in head.get("volumes", [])}
    mounts = [m for c in head["containers"] for m in c.get("volumeMounts", [])]
    (mount,) = [m for m in mounts if path.parent == Path(m["mountPath"])]
    config_map_name = volumes[mount["name"]]["configMap"]["name"]
    (config_map,) = [
        d for d in _load(name) if d["kind"] == "ConfigMap" and d["metadata"]["name"] == config_map_name
    ]
    assert path.name in config_map["data"], f"{name}: ConfigMap {config_map_name} has no key {path.name}"
    yaml.safe_load(config_map["data"][path.name])  # the embedded config parses


@pytest.mark.parametrize("name,doc", _job_docs(), ids=[n for n, _ in _job_docs()])
def test_example_job_config_is_a_valid_pipeline_config(name, doc, tmp_path):
    """The mounted example config loads through the same function the job uses."""
    from pipeline.config import load_config

    path = Path(_config_path(_entrypoint(doc)))
    (config_map,) = [d for d in _load(name) if d["kind"] == "ConfigMap" and path.name in d["data"]]
    local = tmp_path / path.name
    local.write_text(config_map["data"][path.name])
    cfg = load_config(local)
    # The GPU actors the config may start fit in the GPU worker groups of the job's cluster.
    spec = _cluster_spec(doc)
    gpus = sum(
        g["maxReplicas"] * _gpu_limit(c)
        for g in spec["workerGroupSpecs"]
        for c in g["template"]["spec"]["containers"]
    )
    most = lambda n: max(n) if isinstance(n, tuple) else n  # noqa: E731 - actors, or [min, max]
    stages = [cfg.encode, cfg.generate] if cfg.resolved_mode == "split" else [cfg.fused]
    assert sum(most(s.concurrency) * s.num_gpus for s in stages) <= gpus, (
        f"{name}: actor pools can ask for more GPUs than the cluster has"
    )


@pytest.mark.parametrize("name,doc", _job_docs(), ids=[n for n, _ in _job_docs()])
def test_job_runtime_env_matches_infra_runtime_env(name, doc):
    from ray.runtime_env import RuntimeEnv

    env = yaml.safe_load(_job_spec(doc)["runtimeEnvYAML"])
    assert not set(env) - set(RuntimeEnv.known_fields)
    assert "working_dir" not in env, "the code is in the image; a local working_dir means nothing here"
    RuntimeEnv(**env)
    reference = yaml.safe_load((INFRA / "runtime_env.yaml").read_text())["env_vars"]
    assert env["env_vars"] == reference, f"{name}: env_vars differ from infra/runtime_env.yaml"


@pytest.mark.parametrize("name", sorted(EXPECTED_ENTRYPOINTS))
def test_entrypoint_module_exists(name):
    (doc,) = [d for d in _load(name) if _job_spec(d) is not None]
    module = _module_of(_entrypoint(doc))
    assert re.fullmatch(r"jobs\.[a-z_][a-z0-9_]*", module), module
    path = ROOT / (module.replace(".", "/") + ".py")
    assert path.is_file(), f"{path.relative_to(ROOT)}: the manifest runs a module that does not exist"


# --- Dockerfile -----------------------------------------------------------------------------------


def _pyproject() -> dict:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_dockerfile_base_image_and_workdir():
    text = DOCKERFILE.read_text()
    assert _dockerfile_base_image().startswith("rayproject/ray:")
    assert re.search(r"^WORKDIR\s+/\S+", text, flags=re.M), "Dockerfile must set a WORKDIR"


def test_dockerfile_ray_version_satisfies_pyproject():
    from packaging.requirements import Requirement

    (ray_req,) = [
        Requirement(r) for r in _pyproject()["project"]["dependencies"] if Requirement(r).name == "ray"
    ]
    assert ray_req.specifier.contains(_dockerfile_ray_version())


def test_dockerfile_installs_the_project_from_pyproject():
    text = DOCKERFILE.read_text()
    copies = " ".join(re.findall(r"^COPY\s+(.+)$", text, flags=re.M))
    assert "pyproject.toml" in copies
    assert re.search(r"pip install\b[^\n]*\s\.\s*$", text, flags=re.M), (
        "install the project with `pip install .`"
    )
    for pattern in _pyproject()["tool"]["setuptools"]["packages"]["find"]["include"]:
        package = pattern.rstrip("*")
        assert re.search(rf"^COPY\s+.*\b{package}\b", text, flags=re.M), f"package {package} is not copied"


def test_dockerfile_non_root_and_no_secrets():
    text = DOCKERFILE.read_text()
    users = re.findall(r"^USER\s+(\S+)", text, flags=re.M)
    assert users and users[-1] not in ("root", "0"), "run as a non-root user"
    for line in text.splitlines():
        if re.match(r"^\s*(ENV|ARG)\b", line):
            assert not any(s in line for s in SECRET_NAMES), f"credential in the image: {line}"


def test_dockerignore_keeps_context_small_but_complete():
    entries = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()}
    entries.discard("")
    assert {".git", ".venv"} <= entries
    needed = ["pyproject.toml", "README.md", "dycoke", "pipeline", "jobs"]
    assert not [n for n in needed if n in entries], "the image build needs these in the context"


# --- IAM policy -----------------------------------------------------------------------------------

WRITE_ACTIONS = {"s3:PutObject", "s3:DeleteObject", "s3:AbortMultipartUpload"}


def _statements() -> list[dict]:
    policy = json.loads(IAM_POLICY.read_text())
    assert policy["Version"] == "2012-10-17"
    return policy["Statement"]


def _as_list(value) -> list[str]:
    return [value] if isinstance(value, str) else list(value)


def test_iam_policy_is_least_privilege():
    write_resources = set()
    for st in _statements():
        assert st["Effect"] == "Allow" and st.get("Sid")
        actions, resources = _as_list(st["Action"]), _as_list(st["Resource"])
        assert all(a.startswith("s3:") and "*" not in a for a in actions), st["Sid"]
        assert all(r.startswith("arn:aws:s3:::") and r != "arn:aws:s3:::*" for r in resources), st["Sid"]
        if "s3:ListBucket" in actions:
            assert all("/" not in r.removeprefix("arn:aws:s3:::") for r in resources)
            assert st["Condition"]["StringLike"]["s3:prefix"], f"{st['Sid']}: list only the needed prefixes"
        if WRITE_ACTIONS & set(actions):
            write_resources.update(resources)
    assert len(write_resources) == 1, "write actions must be limited to the output prefix"
    (out,) = write_resources
    assert re.fullmatch(r"arn:aws:s3:::[a-z0-9.-]+/[^*]+/\*", out), f"output must be a prefix, got {out}"


def _allowed(action: str, uri: str) -> bool:
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    probe = f"arn:aws:s3:::{bucket}/{key}some-object"
    for st in _statements():
        if action in _as_list(st["Action"]):
            if any(fnmatch.fnmatchcase(probe, r) for r in _as_list(st["Resource"])):
                return True
    return False


def _listable(uri: str) -> bool:
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    for st in _statements():
        if "s3:ListBucket" in _as_list(st["Action"]) and f"arn:aws:s3:::{bucket}" in _as_list(st["Resource"]):
            prefixes = _as_list(st["Condition"]["StringLike"]["s3:prefix"])
            if any(fnmatch.fnmatchcase(key, p) for p in prefixes):
                return True
    return False


def test_iam_policy_covers_inputs_model_cache_and_output():
    resources = {
        r
        for st in _statements()
        if "s3:GetObject" in _as_list(st["Action"])
        for r in _as_list(st["Resource"])
    }
    assert len({r.split("/")[0] for r in resources}) >= 3, "inputs, model cache and outputs are readable"


def test_example_configs_use_locations_the_policy_allows():
    uris = []
    for name in MANIFEST_KINDS:
        for doc in _load(name):
            if doc["kind"] == "ConfigMap":
                for text in doc["data"].values():
                    uris += re.findall(r"s3://[^\s'\"]+", text)
    assert uris
    for uri in uris:
        assert _listable(uri), f"{uri}: no ListBucket for this prefix in infra/iam-policy.json"
        assert _allowed("s3:GetObject", uri) or _allowed("s3:PutObject", uri), (
            f"{uri}: not covered by the policy"
        )


# --- README ---------------------------------------------------------------------------------------


def test_readme_covers_the_workflow_without_local_paths():
    text = (INFRA / "README.md").read_text()
    for needed in (
        "docker build -f infra/Dockerfile",
        "ray up ray_cluster.yaml",
        "ray job submit",
        "--runtime-env infra/runtime_env.yaml",
        "python -m jobs.corpus --config",
        "kubectl apply -f infra/kuberay/",
        "iam-policy.json",
    ):
        assert needed in text, f"infra/README.md should mention {needed!r}"
    assert not re.search(r"(?<![\w.])/(?:work|Users|root|mnt|tmp)/", text), "no absolute local paths"
