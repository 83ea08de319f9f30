"""Deployment files: generated compose files and manifests are valid and match the topology they came from.

Compose files are validated by Debian's docker-compose (`config -q` needs no engine; .ci/run installs it).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from service.partitions import PartitionKind, load_topology
from tests.helpers import ROOT, migserve

DEPLOY = ROOT / "deploy"
TOPOLOGIES = sorted((DEPLOY / "topologies").glob("*.yaml"))


def compose_config(path: Path) -> dict[str, Any]:
    """`docker-compose config`: validates the file and prints it resolved."""
    binary = shutil.which("docker-compose")
    if binary is None:
        pytest.fail("docker-compose is needed to validate compose files: apt-get install -y docker-compose (.ci/run does)")
    run = subprocess.run([binary, "-f", str(path), "config"], capture_output=True, text=True, check=False)
    assert run.returncode == 0, f"{path} is not a valid compose file:\n{run.stderr}"
    resolved: dict[str, Any] = yaml.safe_load(run.stdout)
    return resolved


def _keeps_jobs_in_a_named_volume(config: dict[str, Any]) -> None:
    """serve --jobs-dir in the user's cache, where a named volume outlives the container (CT jobs outlive a restart)."""
    gateway = config["services"]["gateway"]
    jobs_dir = gateway["command"][gateway["command"].index("--jobs-dir") + 1]
    assert jobs_dir.startswith("/home/migserve/.cache/")
    assert "migserve-cache:/home/migserve/.cache:rw" in gateway["volumes"] and "migserve-cache" in config["volumes"]
    assert gateway["stop_grace_period"] == "60s", "time to answer what it has in flight and pause its jobs (10 s by default)"


@pytest.mark.parametrize("topology", TOPOLOGIES, ids=lambda p: p.stem)
def test_generated_compose_has_one_triton_per_mig_instance(topology: Path, tmp_path: Path) -> None:
    run = migserve("deploy", "compose", "--topology", topology, "--out", tmp_path)
    assert run.returncode == 0, run.stderr
    instances = [p for p in load_topology(topology) if p.kind is PartitionKind.MIG]
    config = compose_config(tmp_path / "docker-compose.yml")
    _keeps_jobs_in_a_named_volume(config)
    services = config["services"]
    tritons = {name: s for name, s in services.items() if name.startswith("triton-")}
    assert len(tritons) == len(instances) >= 3
    assert {"gateway", "prometheus", "grafana", "dcgm-exporter"} <= set(services)
    published = [p["published"] for s in services.values() for p in s.get("ports", [])]
    assert len(published) == len(set(published)), "every service has its own host ports"
    for instance in instances:
        service = tritons[f"triton-{instance.id}"]
        assert service["environment"]["NVIDIA_VISIBLE_DEVICES"] == instance.device
        assert service["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"] == [instance.device]
        assert any(str(v).endswith(":/models:ro") for v in service["volumes"]), "models mounted read-only"
        assert service["image"].startswith("nvcr.io/nvidia/tritonserver:")
    gateway_topology = load_topology(tmp_path / "topology.gateway.yaml")
    assert [(p.id, p.kind, p.url) for p in gateway_topology] == [(i.id, PartitionKind.TRITON, f"triton-{i.id}:8001") for i in instances], (
        "the gateway reaches every Triton by its service name"
    )
    targets = {
        c["job_name"]: c["static_configs"][0]["targets"]
        for c in yaml.safe_load((tmp_path / "prometheus.yml").read_text())["scrape_configs"]
    }
    assert targets["migserve-gateway"] == ["gateway:8000"] and targets["dcgm-exporter"] == ["dcgm-exporter:9400"]
    assert sorted(targets["triton"]) == sorted(f"triton-{i.id}:8002" for i in instances)


def test_the_committed_deploy_files_are_the_generator_s_output(tmp_path: Path) -> None:
    source = DEPLOY / "topologies" / "a100-3g-2g-2g.yaml"
    assert migserve("deploy", "compose", "--topology", "deploy/topologies/a100-3g-2g-2g.yaml", "--out", tmp_path).returncode == 0
    assert migserve("deploy", "k8s", "--topology", "deploy/topologies/a100-3g-2g-2g.yaml", "--out", tmp_path / "k8s").returncode == 0
    for name in ("docker-compose.yml", "topology.gateway.yaml", "prometheus.yml", "k8s/migserve.yaml"):
        assert (tmp_path / name).read_text() == (DEPLOY / name).read_text(), f"deploy/{name} is stale: regenerate from {source.name}"


def test_cpu_compose_file_is_valid_and_serves_embedded_workers() -> None:
    config = compose_config(DEPLOY / "docker-compose.cpu.yml")
    services = config["services"]
    assert set(services) == {"gateway", "prometheus", "grafana"}
    assert "--topology" not in services["gateway"]["command"], "CPU slices are discovered"
    assert services["gateway"]["shm_size"] == "2g", "batches pass through /dev/shm (64 MB by default)"
    # the CPU workers' timings outlive the container (--cpu-run-slices-cache): a named volume at the user's cache
    _keeps_jobs_in_a_named_volume(config)
    assert yaml.safe_load((DEPLOY / "prometheus.cpu.yml").read_text())["scrape_configs"][0]["static_configs"][0]["targets"] == [
        "gateway:8000"
    ]


@pytest.mark.parametrize("topology", TOPOLOGIES, ids=lambda p: p.stem)
def test_k8s_manifests_request_mig_resources_per_profile(topology: Path, tmp_path: Path) -> None:
    assert migserve("deploy", "k8s", "--topology", topology, "--out", tmp_path).returncode == 0
    docs = list(yaml.safe_load_all((tmp_path / "migserve.yaml").read_text()))
    for doc in docs:
        assert {"apiVersion", "kind", "metadata"} <= set(doc) and doc["metadata"]["name"]
    profiles: dict[str, int] = {}
    for p in load_topology(topology):
        profiles[p.profile or ""] = profiles.get(p.profile or "", 0) + 1
    deployments = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Deployment"}
    services = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}
    for profile, count in profiles.items():
        name = f"triton-{profile.replace('.', '-')}"
        spec = deployments[name]["spec"]
        container = spec["template"]["spec"]["containers"][0]
        assert spec["replicas"] == count and container["resources"]["limits"] == {f"nvidia.com/mig-{profile}": 1}
        assert spec["selector"]["matchLabels"].items() <= spec["template"]["metadata"]["labels"].items()
        assert services[name]["spec"]["selector"] == spec["selector"]["matchLabels"]
    assert "migserve-gateway" in deployments and "migserve-gateway" in services
    (claim,) = [d for d in docs if d["kind"] == "PersistentVolumeClaim"]
    assert claim["spec"] == {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "10Gi"}}}
    volume = {"name": _jobs_volume(deployments["migserve-gateway"]), "persistentVolumeClaim": {"claimName": claim["metadata"]["name"]}}
    assert volume in deployments["migserve-gateway"]["spec"]["template"]["spec"]["volumes"], "CT jobs outlive the pod"
    assert deployments["migserve-gateway"]["spec"]["strategy"] == {"type": "Recreate"}, "the old pod lets go of the jobs first"
    assert deployments["migserve-gateway"]["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 60, "30 by default"
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    uid, gid = (re.search(rf"useradd .*--{flag} (\d+)", dockerfile) for flag in ("uid", "gid"))
    assert uid is not None and gid is not None and f"groupadd --gid {gid[1]} migserve" in dockerfile
    security = deployments["migserve-gateway"]["spec"]["template"]["spec"]["securityContext"]
    assert (security["runAsUser"], security["runAsGroup"], security["fsGroup"]) == (int(uid[1]), int(gid[1]), int(gid[1])), (
        "the claim made the image user's group's, so the gateway can make its jobs directory there"
    )
    config = next(d for d in docs if d["kind"] == "ConfigMap")
    (tmp_path / "gateway.yaml").write_text(config["data"]["topology.yaml"])
    assert {p.url for p in load_topology(tmp_path / "gateway.yaml")} == {f"triton-{p.replace('.', '-')}:8001" for p in profiles}
    monitor = next(d for d in docs if d["kind"] == "ServiceMonitor")
    assert {e["port"] for e in monitor["spec"]["endpoints"]} == {"http", "metrics"}


def _jobs_volume(deployment: dict[str, Any]) -> str:
    """The name of the volume the gateway's --jobs-dir is on."""
    (gateway,) = deployment["spec"]["template"]["spec"]["containers"]
    jobs_dir = gateway["args"][gateway["args"].index("--jobs-dir") + 1]
    mounts = {m["mountPath"]: m["name"] for m in gateway["volumeMounts"]}
    (mount,) = [path for path in mounts if jobs_dir.startswith(path + "/")]
    return str(mounts[mount])


def test_k8s_jobs_on_an_empty_dir_instead_of_a_claim(tmp_path: Path) -> None:
    """--jobs-claim-gb 0: the jobs in an emptyDir (kept while the pod lives) and the gateway rolled as before; a size
    that is not one is refused, naming what it takes."""
    topology = TOPOLOGIES[0]
    assert migserve("deploy", "k8s", "--topology", topology, "--out", tmp_path, "--jobs-claim-gb", "0").returncode == 0
    docs = list(yaml.safe_load_all((tmp_path / "migserve.yaml").read_text()))
    assert not [d for d in docs if d["kind"] == "PersistentVolumeClaim"]
    (gateway,) = [d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "migserve-gateway"]
    assert {"name": _jobs_volume(gateway), "emptyDir": {}} in gateway["spec"]["template"]["spec"]["volumes"]
    assert "strategy" not in gateway["spec"]
    assert "--jobs-claim-gb 0`" in (tmp_path / "migserve.yaml").read_text().splitlines()[0]
    for bad in ("-1", "nan", "lots"):
        refused = migserve("deploy", "k8s", "--topology", topology, "--out", tmp_path, "--jobs-claim-gb", bad)
        assert refused.returncode == 2 and f"{bad!r}: expected a size in GiB, 0 or more (0: an emptyDir)" in refused.stderr


def test_dockerfile_is_slim_non_root_torch_free_offline_and_checks_health() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    assert "FROM python:3.11-slim" in text and "\nUSER migserve" in text and "HEALTHCHECK" in text
    assert "\nENV ORT_DISABLE_TELEMETRY=1\n" in text  # onnxruntime's usage events (tests/integration/test_offline.py)
    assert "/v2/health/ready" in text and "torch" not in text.replace("No torch", "") and "[export" not in text


def test_grafana_dashboard_covers_the_partitions() -> None:
    dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "migserve.json").read_text())
    exprs = " ".join(t["expr"] for p in dashboard["panels"] for t in p["targets"])
    gateway = ("migserve_batch_size_sum", "migserve_request_seconds_bucket", "migserve_queue_depth", "migserve_partition_compute_seconds")
    memory = ("migserve_worker_oom_kills", "migserve_memory_working_set_bytes", "migserve_memory_limit_bytes")
    clients = ("migserve_clients_disconnected_total",)
    jobs = ("migserve_jobs_running", "migserve_jobs_ended_total", "migserve_job_seconds_bucket")
    for metric in (*gateway, *memory, *clients, *jobs, "DCGM_FI_PROF_GR_ENGINE_ACTIVE"):
        assert metric in exprs


def test_a_topology_without_mig_instances_is_refused(tmp_path: Path) -> None:
    topology = tmp_path / "cpu.yaml"
    topology.write_text("partitions:\n  - {id: a, kind: cpu, cores: [0]}\n")
    run = migserve("deploy", "compose", "--topology", topology, "--out", tmp_path / "out")
    assert run.returncode == 2 and "declares no MIG partitions" in run.stderr
