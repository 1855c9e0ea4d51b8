"""ray_cluster.yaml and infra/runtime_env.yaml, checked with Ray's own validation code.

Nothing here talks to AWS or starts Ray: the cluster config goes through the same
``prepare_config`` + ``validate_config`` steps ``ray up`` runs before it contacts the cloud, and the
runtime environment is parsed the way ``ray job submit --runtime-env`` parses it.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CLUSTER_YAML = ROOT / "ray_cluster.yaml"
RUNTIME_ENV_YAML = ROOT / "infra" / "runtime_env.yaml"

# What the hardware offers, for the instance types this project uses: (vCPUs, GPUs).
KNOWN_INSTANCES = {
    "m7i.2xlarge": (8, 0),
    "m7i.4xlarge": (16, 0),
    "m7i.8xlarge": (32, 0),
    "c7i.4xlarge": (16, 0),
    "c7i.8xlarge": (32, 0),
    "g6e.xlarge": (4, 1),
    "g6e.2xlarge": (8, 1),
    "g6e.4xlarge": (16, 1),
    "p4d.24xlarge": (96, 8),
    "p5.48xlarge": (192, 8),
    "p5e.48xlarge": (192, 8),
    "p5en.48xlarge": (192, 8),
}


@pytest.fixture(scope="module")
def cluster() -> dict:
    config = yaml.safe_load(CLUSTER_YAML.read_text())
    assert isinstance(config, dict), "ray_cluster.yaml must be a mapping"
    return config


def _worker_types(cluster: dict) -> dict[str, dict]:
    head = cluster["head_node_type"]
    return {name: nt for name, nt in cluster["available_node_types"].items() if name != head}


def _by_gpus(cluster: dict, gpus: int) -> list[tuple[str, dict]]:
    return [(n, nt) for n, nt in _worker_types(cluster).items() if nt["resources"].get("GPU", 0) == gpus]


def _is_spot(node_type: dict) -> bool:
    market = node_type["node_config"].get("InstanceMarketOptions", {})
    return market.get("MarketType") == "spot"


# --- Ray's own validation -------------------------------------------------------------------------


def test_matches_rays_cluster_schema(cluster):
    jsonschema = pytest.importorskip("jsonschema")
    import ray.autoscaler

    schema_path = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    schema = json.loads(schema_path.read_text())
    jsonschema.validate(cluster, schema)


def test_rays_validate_config_accepts_it(cluster):
    """What `ray up` does before any cloud call: merge the AWS defaults, then validate."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(cluster))
    validate_config(prepared)
    # The defaults merge must not have replaced our settings.
    assert prepared["docker"]["image"] == cluster["docker"]["image"]
    assert prepared["available_node_types"][cluster["head_node_type"]]["resources"] == {"CPU": 0}


def test_validation_is_not_vacuous(cluster):
    """The same validation path rejects a key Ray does not know."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    broken = copy.deepcopy(cluster)
    broken["available_node_types"][cluster["head_node_type"]]["not_a_ray_key"] = 1
    with pytest.raises(Exception, match="not_a_ray_key"):
        validate_config(prepare_config(broken))


# --- required content -----------------------------------------------------------------------------


def test_aws_provider(cluster):
    assert cluster["provider"]["type"] == "aws"
    assert cluster["provider"].get("region")


def test_head_is_cpu_only_and_schedules_nothing(cluster):
    head = cluster["available_node_types"][cluster["head_node_type"]]
    assert head["resources"].get("CPU") == 0, "head must advertise CPU: 0 so no task lands on it"
    assert head["resources"].get("GPU", 0) == 0
    _, gpus = KNOWN_INSTANCES.get(head["node_config"]["InstanceType"], (None, 0))
    assert gpus == 0, "the head node must be a CPU instance"
    assert not _is_spot(head), "the head must be on-demand: losing it loses the whole cluster"
    assert head.get("max_workers", 0) == 0


def test_three_worker_types_with_expected_gpus(cluster):
    cpu = [(n, nt) for n, nt in _by_gpus(cluster, 0) if nt["resources"].get("CPU", 0) > 0]
    small_gpu = _by_gpus(cluster, 1)
    large_gpu = _by_gpus(cluster, 8)
    assert cpu, "need a CPU worker type for decoding"
    assert small_gpu, "need a 1-GPU worker type for 0.5B / 7B models"
    assert large_gpu, "need an 8-GPU worker type for 72B-class models"


def test_resources_fit_the_instance_types(cluster):
    for name, nt in cluster["available_node_types"].items():
        instance = nt["node_config"]["InstanceType"]
        assert instance in KNOWN_INSTANCES, f"{name}: add {instance} to KNOWN_INSTANCES with its vCPUs/GPUs"
        vcpus, gpus = KNOWN_INSTANCES[instance]
        assert nt["resources"].get("GPU", 0) == gpus, (
            f"{name}: GPU resource must equal the GPUs of {instance}"
        )
        assert nt["resources"].get("CPU", vcpus) <= vcpus, f"{name}: advertises more CPUs than {instance} has"


def test_spot_for_cpu_and_small_gpu_workers(cluster):
    for name, nt in _by_gpus(cluster, 0) + _by_gpus(cluster, 1):
        assert _is_spot(nt), f"{name} should run on spot instances"


def test_autoscaling_bounds(cluster):
    assert cluster["idle_timeout_minutes"] > 0
    total_min = 0
    for name, nt in _worker_types(cluster).items():
        lo, hi = nt.get("min_workers", 0), nt.get("max_workers")
        assert hi is not None, f"{name}: set max_workers explicitly"
        assert 0 <= lo <= hi, f"{name}: need 0 <= min_workers <= max_workers"
        assert hi >= 1, f"{name}: max_workers 0 makes the type unusable"
        assert hi <= cluster["max_workers"], f"{name}: max_workers above the global max_workers"
        total_min += lo
    assert total_min <= cluster["max_workers"]


def test_docker_image_and_minimal_setup(cluster):
    docker = cluster["docker"]
    image = docker["image"]
    assert image and ":" in image.rsplit("/", 1)[-1], "pin the image by tag"
    assert "dycoke-pipeline" in image, "the image built from infra/Dockerfile"
    assert docker.get("container_name")
    setup = [
        cmd
        for key in ("setup_commands", "head_setup_commands", "worker_setup_commands")
        for cmd in cluster.get(key) or []
    ]
    assert not any("pip install" in cmd for cmd in setup), "dependencies belong in the image"


# --- runtime environment --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def runtime_env() -> dict:
    from ray.dashboard.modules.dashboard_sdk import parse_runtime_env_args

    # Exactly what `ray job submit --working-dir . --runtime-env infra/runtime_env.yaml` builds.
    return parse_runtime_env_args(runtime_env=str(RUNTIME_ENV_YAML), working_dir=".")


def test_runtime_env_uses_only_fields_ray_knows(runtime_env):
    from ray.runtime_env import RuntimeEnv

    unknown = set(runtime_env) - set(RuntimeEnv.known_fields)
    assert not unknown, f"fields RuntimeEnv does not know: {sorted(unknown)}"
    RuntimeEnv(**runtime_env)  # type checks of every field, no cluster needed


def test_runtime_env_content(runtime_env):
    raw = yaml.safe_load(RUNTIME_ENV_YAML.read_text())
    assert raw["working_dir"] == "."
    env = raw["env_vars"]
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in env.items())
    assert env["RAY_DATA_VERBOSE_PROGRESS"] == "1"
    assert env["HF_HUB_OFFLINE"] == "1"
    # Image route: no per-node installs.
    assert not {"pip", "uv", "conda"} & set(raw)
    # ... and the pip route is documented in the comments.
    assert "#   pip:" in RUNTIME_ENV_YAML.read_text()


def test_working_dir_upload_stays_small(runtime_env):
    """`--working-dir .` must not ship .git, .venv, videos or weights (Ray caps the package size)."""
    try:
        from ray._private.runtime_env.packaging import _dir_travel, _get_excludes
    except ImportError:  # private API moved
        pytest.skip("ray's working_dir packaging helpers are not importable in this Ray version")

    root = ROOT.absolute()
    files: list[Path] = []

    def handler(path: Path) -> None:
        if path.is_file():
            files.append(path)

    _dir_travel(root, [_get_excludes(root, runtime_env.get("excludes", []))], handler, include_gitignore=True)
    rel = [p.relative_to(root) for p in files]
    assert not [p for p in rel if p.parts[0] in (".git", ".venv")]
    assert not [p for p in rel if p.suffix in (".safetensors", ".mp4", ".parquet")]
    total = sum(p.stat().st_size for p in files)
    assert total < 100 * 2**20, f"working_dir would upload {total / 2**20:.0f} MiB"
