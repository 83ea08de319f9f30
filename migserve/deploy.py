"""`migserve deploy compose|k8s`: deployment files generated from a topology of MIG instances.

compose: one `tritonserver` service per MIG instance (the official image, its
own host ports, `NVIDIA_VISIBLE_DEVICES=MIG-<uuid>` and the device reserved),
the gateway with a topology that names those Tritons as partitions, Prometheus
scraping the gateway, every Triton and dcgm-exporter, and Grafana with the
dashboard in deploy/grafana/. k8s: one Triton Deployment and Service per MIG
profile requesting `nvidia.com/mig-<profile>` (the device plugin's mixed
strategy), replicas = instances of that profile, the gateway Deployment,
Service and topology ConfigMap, a PersistentVolumeClaim for the gateway's CT jobs
(`--jobs-claim-gb`), and a ServiceMonitor.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

import yaml

TRITON_IMAGE = "nvcr.io/nvidia/tritonserver:24.08-py3"
DCGM_IMAGE = "nvcr.io/nvidia/k8s/dcgm-exporter:3.3.7-3.5.0-ubuntu22.04"
PROMETHEUS_IMAGE = "prom/prometheus:v2.53.1"
GRAFANA_IMAGE = "grafana/grafana:11.1.4"
GATEWAY_IMAGE = "migserve-gateway:0.1.0"
CACHE = "/home/migserve/.cache"  # the gateway user's; the image makes it theirs, so a Docker volume mounted there starts out so
GATEWAY_ID = 10001  # the image's user and group (deploy/Dockerfile): a Kubernetes volume is made theirs by fsGroup
JOBS_DIR = f"{CACHE}/migserve/jobs"  # serve --jobs-dir: CT jobs outlive a restart of the gateway's container
# How long the gateway may take to stop before it is killed: it answers what it has in flight (each request within
# --timeout-s, 30 s), then gives gRPC calls 5 s, its jobs 5 s and its workers 5 s. Docker's default is 10 s and a
# pod's 30: a gateway killed there cuts the requests it was answering, and its CT jobs count a kill (two and they
# are not run again).
STOP_GRACE_S = 60
JOBS_CLAIM = "migserve-jobs"  # k8s: the claim the gateway's cache (and --jobs-dir in it) lives on
JOBS_CLAIM_GB = 10.0  # its default size: running jobs' uploads (--max-jobs of --max-body-mb) and 512 MB of label maps
TRITON_PORTS = {"http": 8000, "grpc": 8001, "metrics": 8002}
HOST_PORT_BASE = 18000  # instance i publishes 18000 + 10 i (+1 grpc, +2 metrics)


class _Dumper(yaml.SafeDumper):
    """Plain YAML: no &anchors for repeated dicts, so each manifest reads on its own."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def dump(content: Any) -> str:
    return yaml.dump(content, Dumper=_Dumper, sort_keys=False)


class DeployError(ValueError):
    """A topology that cannot be deployed; the message says why."""


def mig_instances(topology: Path) -> list[dict[str, Any]]:
    """The MIG partitions of a topology file (id, device UUID, profile), in file order."""
    from service.partitions import PartitionKind, TopologyError, load_topology

    try:
        partitions = load_topology(topology)
    except TopologyError as exc:
        raise DeployError(str(exc)) from None
    found = [{"id": p.id, "device": p.device, "profile": p.profile} for p in partitions if p.kind is PartitionKind.MIG]
    if not found:
        raise DeployError(f"{topology} declares no MIG partitions (kind: mig, device: MIG-..., profile: ...)")
    if missing := [p["id"] for p in found if not p["profile"]]:
        raise DeployError(f"{topology}: MIG partitions {missing} need a profile (e.g. 3g.40gb) for Kubernetes resources")
    return found


def _triton_service(instance: dict[str, Any], index: int) -> dict[str, Any]:
    base = HOST_PORT_BASE + 10 * index
    return {
        "image": TRITON_IMAGE,
        "command": [
            "tritonserver",
            "--model-repository=/models",
            *(f"--{name}-port={port}" for name, port in TRITON_PORTS.items()),
        ],
        "environment": {"NVIDIA_VISIBLE_DEVICES": instance["device"]},
        "deploy": {
            "resources": {"reservations": {"devices": [{"driver": "nvidia", "device_ids": [instance["device"]], "capabilities": ["gpu"]}]}}
        },
        "volumes": ["${MODEL_REPO:-../model_repo}:/models:ro"],
        "ports": [f"{base + i}:{port}" for i, port in enumerate(TRITON_PORTS.values())],
        "shm_size": "1g",
        "labels": {"migserve.partition": instance["id"], "migserve.profile": instance["profile"]},
        "healthcheck": {"test": ["CMD", "curl", "-fsS", "localhost:8000/v2/health/ready"], "interval": "10s", "retries": 6},
        "restart": "unless-stopped",
    }


def gateway_topology(instances: list[dict[str, Any]], host: str = "{service}") -> dict[str, Any]:
    """The gateway's own topology: every MIG instance as a Triton partition, reached over gRPC."""
    return {
        "partitions": [
            {
                "id": i["id"],
                "kind": "triton",
                "url": f"{host.format(service=_service(i))}:{TRITON_PORTS['grpc']}",
                "protocol": "grpc",
                "profile": i["profile"],
            }
            for i in instances
        ]
    }


def _service(instance: dict[str, Any]) -> str:
    return f"triton-{instance['id']}"


def prometheus_config(targets: dict[str, list[str]]) -> dict[str, Any]:
    return {
        "global": {"scrape_interval": "5s"},
        "scrape_configs": [{"job_name": job, "static_configs": [{"targets": hosts}]} for job, hosts in targets.items()],
    }


def compose(instances: list[dict[str, Any]]) -> dict[str, Any]:
    tritons = {_service(i): _triton_service(i, n) for n, i in enumerate(instances)}
    return {
        "services": {
            "gateway": _gateway_service(list(tritons), "./topology.gateway.yaml:/etc/migserve/topology.yaml:ro"),
            **tritons,
            "dcgm-exporter": {
                "image": DCGM_IMAGE,
                "cap_add": ["SYS_ADMIN"],
                "deploy": {"resources": {"reservations": {"devices": [{"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}]}}},
                "ports": ["9400:9400"],
                "restart": "unless-stopped",
            },
            **_monitoring("./prometheus.yml"),
        },
        "volumes": {"migserve-cache": {}},
    }


def _gateway_service(depends_on: list[str], topology_mount: str | None) -> dict[str, Any]:
    command = ["migserve", "serve", "--host", "0.0.0.0", "--port", "8000", "--grpc-port", "8001", "--model-repo", "/models"]
    command += ["--jobs-dir", JOBS_DIR]
    volumes = ["${MODEL_REPO:-../model_repo}:/models:ro", f"migserve-cache:{CACHE}"]
    if topology_mount:
        command += ["--topology", "/etc/migserve/topology.yaml"]
        volumes.append(topology_mount)
    service: dict[str, Any] = {
        "build": {"context": "..", "dockerfile": "deploy/Dockerfile"},
        "image": GATEWAY_IMAGE,
        "command": command,
        "volumes": volumes,
        "ports": ["8000:8000", "8001:8001"],
        "stop_grace_period": f"{STOP_GRACE_S}s",
        "restart": "unless-stopped",
    }
    if depends_on:
        service["depends_on"] = depends_on
    return service


def _monitoring(prometheus_file: str) -> dict[str, Any]:
    return {
        "prometheus": {
            "image": PROMETHEUS_IMAGE,
            "volumes": [f"{prometheus_file}:/etc/prometheus/prometheus.yml:ro"],
            "ports": ["9090:9090"],
            "restart": "unless-stopped",
        },
        "grafana": {
            "image": GRAFANA_IMAGE,
            "environment": {"GF_AUTH_ANONYMOUS_ENABLED": "true", "GF_AUTH_ANONYMOUS_ORG_ROLE": "Viewer"},
            "volumes": ["./grafana/provisioning:/etc/grafana/provisioning:ro", "./grafana/dashboards:/var/lib/grafana/dashboards:ro"],
            "ports": ["3000:3000"],
            "depends_on": ["prometheus"],
            "restart": "unless-stopped",
        },
    }


def write_compose(topology: Path, out: Path) -> list[Path]:
    """docker-compose.yml, topology.gateway.yaml and prometheus.yml in `out` (grafana/ is static, beside them)."""
    instances = mig_instances(topology)
    out.mkdir(parents=True, exist_ok=True)
    targets = {
        "migserve-gateway": ["gateway:8000"],
        "triton": [f"{_service(i)}:{TRITON_PORTS['metrics']}" for i in instances],
        "dcgm-exporter": ["dcgm-exporter:9400"],
    }
    files = {
        "docker-compose.yml": compose(instances),
        "topology.gateway.yaml": gateway_topology(instances),
        "prometheus.yml": prometheus_config(targets),
    }
    header = f"# Generated by `migserve deploy compose --topology {topology}`; edit the topology and regenerate.\n"
    for name, content in files.items():
        (out / name).write_text(header + dump(content))
    return [out / name for name in files]


def kubernetes(instances: list[dict[str, Any]], jobs_claim_gb: float = JOBS_CLAIM_GB) -> list[dict[str, Any]]:
    """Manifests: a Triton Deployment + Service per profile, the gateway, its topology, a ServiceMonitor; and the
    gateway's CT jobs on a claim of `jobs_claim_gb` (0: an emptyDir, kept only while the pod lives). On a claim the
    gateway's pod is recreated, not rolled: one gateway to a jobs directory, so a new pod could not start (nor become
    ready) while the old one holds it; the old one stops first, leaving its running jobs for the new one to run again."""
    profiles = Counter(i["profile"] for i in instances)
    docs: list[dict[str, Any]] = []
    for profile, count in profiles.items():
        name = f"triton-{profile.replace('.', '-')}"
        labels = {"app": name, "migserve/role": "triton", "migserve/profile": profile}
        container = {
            "name": "tritonserver",
            "image": TRITON_IMAGE,
            "args": ["tritonserver", "--model-repository=/models", *(f"--{n}-port={p}" for n, p in TRITON_PORTS.items())],
            "ports": [{"name": n, "containerPort": p} for n, p in TRITON_PORTS.items()],
            "resources": {"limits": {f"nvidia.com/mig-{profile}": 1}},
            "readinessProbe": {"httpGet": {"path": "/v2/health/ready", "port": "http"}, "periodSeconds": 5},
            "volumeMounts": [{"name": "models", "mountPath": "/models", "readOnly": True}],
        }
        docs.append(_deployment(name, labels, count, container))
        docs.append(_service_manifest(name, labels, TRITON_PORTS))
    gateway_labels = {"app": "migserve-gateway", "migserve/role": "gateway"}
    topology = gateway_topology_k8s(profiles)
    docs.append(
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "migserve-topology"},
            "data": {"topology.yaml": dump(topology)},
        }
    )
    gateway = {
        "name": "gateway",
        "image": GATEWAY_IMAGE,
        "args": [
            "migserve",
            "serve",
            "--host",
            "0.0.0.0",
            "--port",
            "8000",
            "--grpc-port",
            "8001",
            "--model-repo",
            "/models",
            "--topology",
            "/etc/migserve/topology.yaml",
            "--jobs-dir",
            JOBS_DIR,
        ],
        "ports": [{"name": "http", "containerPort": 8000}, {"name": "grpc", "containerPort": 8001}],
        "readinessProbe": {"httpGet": {"path": "/v2/health/ready", "port": "http"}, "periodSeconds": 5},
        "livenessProbe": {"httpGet": {"path": "/v2/health/live", "port": "http"}, "periodSeconds": 10},
        "volumeMounts": [
            {"name": "models", "mountPath": "/models", "readOnly": True},
            {"name": "topology", "mountPath": "/etc/migserve", "readOnly": True},
            {"name": "cache", "mountPath": CACHE},
        ],
    }
    cache: dict[str, Any] = {"persistentVolumeClaim": {"claimName": JOBS_CLAIM}} if jobs_claim_gb else {"emptyDir": {}}
    extra = [{"name": "topology", "configMap": {"name": "migserve-topology"}}, {"name": "cache", **cache}]
    if jobs_claim_gb:
        docs.append(
            {
                "apiVersion": "v1",
                "kind": "PersistentVolumeClaim",
                "metadata": {"name": JOBS_CLAIM, "labels": gateway_labels},
                "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": f"{jobs_claim_gb:g}Gi"}}},
            }
        )
    deployment = _deployment("migserve-gateway", gateway_labels, 1, gateway, extra_volumes=extra)
    pod = deployment["spec"]["template"]["spec"]
    pod["terminationGracePeriodSeconds"] = STOP_GRACE_S
    # a claim's volume starts out root's, and the gateway (not root) could not make its jobs directory there
    pod["securityContext"] = {
        "runAsUser": GATEWAY_ID,
        "runAsGroup": GATEWAY_ID,
        "fsGroup": GATEWAY_ID,
        "fsGroupChangePolicy": "OnRootMismatch",
    }
    if jobs_claim_gb:
        deployment["spec"]["strategy"] = {"type": "Recreate"}
    docs.append(deployment)
    docs.append(_service_manifest("migserve-gateway", gateway_labels, {"http": 8000, "grpc": 8001}))
    docs.append(
        {
            "apiVersion": "monitoring.coreos.com/v1",
            "kind": "ServiceMonitor",
            "metadata": {"name": "migserve", "labels": {"release": "prometheus"}},
            "spec": {
                "selector": {"matchExpressions": [{"key": "migserve/role", "operator": "In", "values": ["gateway", "triton"]}]},
                "endpoints": [
                    {"port": "http", "path": "/metrics", "interval": "5s"},
                    {"port": "metrics", "path": "/metrics", "interval": "5s"},
                ],
            },
        }
    )
    return docs


def gateway_topology_k8s(profiles: Counter[str]) -> dict[str, Any]:
    """One Triton partition per profile Service; Kubernetes spreads requests over that profile's pods."""
    return {
        "partitions": [
            {
                "id": f"triton-{p.replace('.', '-')}",
                "kind": "triton",
                "url": f"triton-{p.replace('.', '-')}:{TRITON_PORTS['grpc']}",
                "protocol": "grpc",
                "profile": p,
            }
            for p in profiles
        ]
    }


def _deployment(
    name: str, labels: dict[str, str], replicas: int, container: dict[str, Any], extra_volumes: Sequence[dict[str, Any]] = ()
) -> dict[str, Any]:
    volumes = [{"name": "models", "persistentVolumeClaim": {"claimName": "migserve-models", "readOnly": True}}, *extra_volumes]
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": labels["app"]}},
            "template": {"metadata": {"labels": labels}, "spec": {"containers": [container], "volumes": volumes}},
        },
    }


def _service_manifest(name: str, labels: dict[str, str], ports: dict[str, int]) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "labels": labels},
        "spec": {"selector": {"app": labels["app"]}, "ports": [{"name": n, "port": p, "targetPort": n} for n, p in ports.items()]},
    }


def write_k8s(topology: Path, out: Path, jobs_claim_gb: float = JOBS_CLAIM_GB) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / "migserve.yaml"
    claim = f" --jobs-claim-gb {jobs_claim_gb:g}" if jobs_claim_gb != JOBS_CLAIM_GB else ""
    header = f"# Generated by `migserve deploy k8s --topology {topology}{claim}`; edit the topology and regenerate.\n"
    path.write_text(header + yaml.dump_all(kubernetes(mig_instances(topology), jobs_claim_gb), Dumper=_Dumper, sort_keys=False))
    return path


def _claim_size(raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"{raw!r}: expected a size in GiB, 0 or more (0: an emptyDir)")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("target", choices=["compose", "k8s"], help="docker-compose files or Kubernetes manifests")
    parser.add_argument("--topology", type=Path, required=True, help="topology YAML listing the MIG instances (kind: mig)")
    parser.add_argument("--out", type=Path, help="output folder (default: deploy/ for compose, deploy/k8s/ for k8s)")
    parser.add_argument(
        "--jobs-claim-gb",
        type=_claim_size,
        default=JOBS_CLAIM_GB,
        help=f"k8s: the gateway's CT jobs (serve --jobs-dir) on a PersistentVolumeClaim of this many GiB, kept through "
        f"rollouts and rescheduling; the gateway's pod is then recreated, not rolled (one gateway to a jobs directory). "
        f"0: an emptyDir, kept only while the pod lives, and rolling updates (default: {JOBS_CLAIM_GB:g})",
    )


def run(args: argparse.Namespace, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    try:
        if args.target == "compose":
            written = write_compose(args.topology, args.out or Path("deploy"))
        else:
            written = [write_k8s(args.topology, args.out or Path("deploy/k8s"), args.jobs_claim_gb)]
    except (DeployError, OSError) as exc:
        print(f"error: {exc}", file=err)
        return 2
    for path in written:
        print(f"wrote {path}", file=out)
    return 0
