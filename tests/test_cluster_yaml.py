"""``cluster.yaml``: valid for Ray's own launcher, and closed to the outside world.

Validation runs offline with the same steps ``ray up`` takes before any cloud call
(``prepare_config`` then ``validate_config``), and against ``ray-schema.json`` directly. The
``ray start`` and ``mlflow server`` lines are parsed by the real click commands, so a
misspelt flag fails here rather than on a half-started cluster.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CLUSTER_YAML = REPO / "cluster.yaml"
PRIVATE_IP_EXPR = "$(hostname -I | awk '{print $1}')"


@pytest.fixture(scope="module")
def raw() -> dict[str, Any]:
    return yaml.safe_load(CLUSTER_YAML.read_text())


@pytest.fixture(scope="module")
def prepared(raw: dict[str, Any]) -> dict[str, Any]:
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(copy.deepcopy(raw))
    validate_config(config)
    return config


# --------------------------------------------------------------------------- helpers


def _ingress_rules(config: dict[str, Any]) -> list[dict[str, Any]]:
    """Inbound rules this config adds on top of Ray's defaults (intra-cluster + SSH)."""
    return list(config["provider"].get("security_group", {}).get("IpPermissions", []))


def _non_ssh_ingress(config: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        rule
        for rule in _ingress_rules(config)
        if not (rule.get("FromPort") == 22 and rule.get("ToPort") == 22)
    ]


def _commands(config: dict[str, Any], key: str) -> list[str]:
    return [str(c) for c in config.get(key, [])]


def _start_ray_commands(config: dict[str, Any]) -> list[str]:
    starts = []
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts += [c for c in _commands(config, key) if "ray start" in c]
    return starts


def _ray_start_params(command: str) -> dict[str, Any]:
    """Parse the ``ray start ...`` part of a shell line with Ray's own click command."""
    from ray.scripts.scripts import start

    part = command[command.index("ray start") :].split(";")[0]
    args = shlex.split(part.replace("$RAY_HEAD_IP", "10.0.0.1"))[2:]
    return dict(start.make_context("start", args).params)


def _mlflow_server_params(config: dict[str, Any]) -> dict[str, Any]:
    from mlflow.cli import server

    lines = [c for c in _commands(config, "head_start_ray_commands") if "mlflow server" in c]
    assert len(lines) == 1, "the head starts exactly one MLflow server"
    line = lines[0].replace(PRIVATE_IP_EXPR, "PRIVATE_IP").replace("$HOME", "/home/ubuntu")
    part = line[line.index("mlflow server") :].split(">")[0]
    args = shlex.split(part)[2:]
    return dict(server.make_context("server", args).params)


def _token_auth_everywhere(config: dict[str, Any]) -> bool:
    starts = _start_ray_commands(config)
    return bool(starts) and all(re.search(r"\bRAY_AUTH_MODE=token\b", c) for c in starts)


# --------------------------------------------------------------------------- validity


def test_passes_rays_own_config_validation(prepared: dict[str, Any]) -> None:
    # prepare_config merged the AWS defaults; the node types are ours, not the defaults'.
    assert set(prepared["available_node_types"]) == {"head", "gpu_a10g_x4", "gpu_a100_x8"}
    assert prepared["head_node_type"] == "head"


def test_raw_file_matches_ray_schema(raw: dict[str, Any]) -> None:
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(raw, schema)
    broken = copy.deepcopy(raw)
    broken["available_node_types"]["gpu_a10g_x4"]["resources"]["GPU"] = 0.5
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema)


def test_every_node_type_declares_integer_cpu_and_gpu(raw: dict[str, Any]) -> None:
    # Explicit resources: otherwise Ray auto-fills them by calling AWS.
    for name, node in raw["available_node_types"].items():
        res = node["resources"]
        assert {"CPU", "GPU"} <= set(res), name
        assert all(isinstance(v, int) for v in res.values()), name
    gpu = raw["available_node_types"]["gpu_a10g_x4"]
    assert gpu["resources"] == {"CPU": 48, "GPU": 4}
    assert gpu["node_config"]["InstanceType"] == "g5.12xlarge"
    assert 0 == gpu["min_workers"] < gpu["max_workers"] <= raw["max_workers"]
    assert raw["idle_timeout_minutes"] > 0
    # The head runs the control plane and MLflow only.
    assert raw["available_node_types"]["head"]["resources"] == {"CPU": 0, "GPU": 0}


def test_start_commands_parse_with_the_real_cli(raw: dict[str, Any]) -> None:
    starts = _start_ray_commands(raw)
    assert len(starts) == 2
    head = next(_ray_start_params(c) for c in starts if "--head" in c)
    assert head["autoscaling_config"] == "~/ray_bootstrap_config.yaml"
    worker = next(_ray_start_params(c) for c in starts if "--head" not in c)
    assert worker["address"] == "10.0.0.1:6379"
    mlflow = _mlflow_server_params(raw)
    # PostgreSQL over the local socket: sqlite lost runs under load (benchmarks/README.md).
    assert mlflow["backend_store_uri"] == "postgresql+psycopg2:///mlflow?host=/var/run/postgresql"
    assert mlflow["artifacts_destination"].startswith("s3://")


# --------------------------------------------------------------------------- security


def test_no_ingress_but_ssh(raw: dict[str, Any]) -> None:
    assert _non_ssh_ingress(raw) == []
    for name, node in raw["available_node_types"].items():
        # Own groups or interfaces would replace the rules checked here.
        assert "SecurityGroupIds" not in node["node_config"], name
        assert "NetworkInterfaces" not in node["node_config"], name
    opened = copy.deepcopy(raw)
    opened["provider"]["security_group"]["IpPermissions"] = [
        {"FromPort": 8265, "ToPort": 8265, "IpProtocol": "tcp", "IpRanges": [{"CidrIp": "0/0"}]}
    ]
    assert _non_ssh_ingress(opened)  # the check would catch an opened dashboard


def test_dashboard_and_jobs_api_bound_to_localhost(raw: dict[str, Any]) -> None:
    head = next(_ray_start_params(c) for c in _start_ray_commands(raw) if "--head" in c)
    assert head["dashboard_host"] in {"127.0.0.1", "localhost"}
    for key in ("head_start_ray_commands", "worker_start_ray_commands", "setup_commands"):
        assert not any("0.0.0.0" in c for c in _commands(raw, key)), key


def test_mlflow_bound_to_the_private_ip(raw: dict[str, Any]) -> None:
    params = _mlflow_server_params(raw)
    assert params["host"] in {"PRIVATE_IP", "127.0.0.1", "localhost"}
    # Jobs on the head log there by default; workers get the URI from the driver.
    head_start = next(c for c in _start_ray_commands(raw) if "--head" in c)
    assert f"MLFLOW_TRACKING_URI=http://{PRIVATE_IP_EXPR}:5000" in head_start


def test_token_auth_on_every_node_with_the_clients_token(raw: dict[str, Any]) -> None:
    assert _token_auth_everywhere(raw)
    assert raw["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    text = CLUSTER_YAML.read_text()
    assert "RAY_AUTH_MODE=disabled" not in text
    assert not re.search(r"RAY_AUTH_TOKEN=\S", text), "a literal token must not be committed"
    weakened = copy.deepcopy(raw)
    weakened["worker_start_ray_commands"] = ["ray start --address=$RAY_HEAD_IP:6379"]
    assert not _token_auth_everywhere(weakened)


def test_credentials_from_instance_roles_only(raw: dict[str, Any]) -> None:
    for name, node in raw["available_node_types"].items():
        assert node["node_config"]["IamInstanceProfile"]["Name"], name
    text = CLUSTER_YAML.read_text()
    for secret in (r"AKIA[0-9A-Z]{16}", r"aws_secret_access_key", r"aws_access_key_id"):
        assert not re.search(secret, text, re.IGNORECASE), secret


def test_multi_node_marker_set_where_jobs_run(raw: dict[str, Any]) -> None:
    # quakeray.preflight.preflight treats the cluster as multi-node while the head is alone.
    from quakeray.preflight import MULTI_NODE_ENV

    for command in _start_ray_commands(raw):
        assert f"{MULTI_NODE_ENV}=1" in command


# --------------------------------------------------------------------------- setup


def test_data_staged_once_per_node_to_local_disk(prepared: dict[str, Any]) -> None:
    # After prepare_config, setup_commands are merged into both head and worker setup.
    for key in ("head_setup_commands", "worker_setup_commands"):
        syncs = [c for c in _commands(prepared, key) if "aws s3 sync" in c]
        assert len(syncs) == 1, key
        assert re.search(r"s3://\S+/quakeset/ \$QUAKERAY_DATA/", syncs[0]), syncs[0]
        installs = [c for c in _commands(prepared, key) if "-e ~/quakeray" in c]
        assert installs and "ray[default,train,tune]==" in installs[0], key


def test_ray_pinned_to_this_clients_version(raw: dict[str, Any]) -> None:
    import ray

    assert f"ray[default,train,tune]=={ray.__version__}" in " ".join(
        _commands(raw, "setup_commands")
    )


def test_checkout_synced_without_ignored_files(raw: dict[str, Any]) -> None:
    assert raw["file_mounts"]["~/quakeray"] == "."
    assert ".gitignore" in raw["rsync_filter"]


def test_job_stop_lets_a_search_close_its_runs(raw: dict[str, Any]) -> None:
    # The Jobs API runs on the head: its supervisor reads these from the head's environment.
    head_start = next(c for c in _start_ray_commands(raw) if "--head" in c)
    assert "RAY_JOB_STOP_SIGNAL=SIGINT" in head_start
    wait = re.search(r"RAY_JOB_STOP_WAIT_TIME_S=(\d+)", head_start)
    assert wait and int(wait.group(1)) >= 30


def test_every_shell_command_parses(prepared: dict[str, Any]) -> None:
    keys = ("head_setup_commands", "worker_setup_commands")
    keys += ("head_start_ray_commands", "worker_start_ray_commands")
    for key in keys:
        for command in _commands(prepared, key):
            # Ray runs each one as `bash --login -c -i '... && (command)'`.
            out = subprocess.run(["bash", "-n", "-c", f"({command})"], capture_output=True)
            assert out.returncode == 0, f"{key}: {command}\n{out.stderr.decode()}"


def test_settings_file_reaches_later_shells(raw: dict[str, Any], tmp_path: Path) -> None:
    # Run the first setup command in a scratch HOME, then read the settings as a later
    # command (and `ray start`) would see them.
    settings = _commands(raw, "setup_commands")[0]
    env = {"HOME": str(tmp_path), "PATH": "/usr/bin:/bin"}
    subprocess.run(["bash", "-c", settings], env=env, check=True)
    subprocess.run(["bash", "-c", settings], env=env, check=True)  # idempotent on re-runs
    bashrc = (tmp_path / ".bashrc").read_text()
    assert bashrc.count("source ~/.quakeray_env") == 1
    shown = subprocess.run(
        ["bash", "-c", "source ~/.quakeray_env; echo $QUAKERAY_DATA:$QUAKERAY_SHARED_PATHS"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert shown == "/data/quakeset:"  # no EFS configured: nothing declared shared
    env_file = tmp_path / ".quakeray_env"
    env_file.write_text(env_file.read_text().replace("QUAKERAY_EFS=", "QUAKERAY_EFS=fs-123", 1))
    shown = subprocess.run(
        ["bash", "-c", "source ~/.quakeray_env; echo $QUAKERAY_SHARED_PATHS"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert shown == "/mnt/efs"


def test_cluster_search_preset_fits_the_cluster(raw: dict[str, Any]) -> None:
    # experiments/cluster/search_64.yaml asks for 16 concurrent 1-GPU trials: every one must
    # fit on a g5.12xlarge node next to its siblings, or trials would wait forever.
    from quakeray.config import load_config
    from quakeray.preflight import SHARED_PATHS_ENV

    cfg = load_config(REPO / "experiments" / "cluster" / "search_64.yaml")
    node = raw["available_node_types"]["gpu_a10g_x4"]
    sc = cfg.scaling
    trial_cpu = cfg.search.trial_cpus + sc.num_workers * sc.cpus_per_worker
    trial_gpu = sc.num_workers * sc.gpus_per_worker
    per_node = min(node["resources"]["CPU"] // trial_cpu, node["resources"]["GPU"] // trial_gpu)
    assert sc.use_gpu and per_node * node["max_workers"] >= cfg.search.max_concurrent
    assert cfg.data.path.startswith("/data/quakeset/")  # QUAKERAY_DATA in setup_commands
    # The search folder sits on the EFS mount that the settings declare shared.
    assert cfg.run.storage_path.startswith("/mnt/efs/")
    assert f"export {SHARED_PATHS_ENV}=/mnt/efs" in _commands(raw, "setup_commands")[0]
