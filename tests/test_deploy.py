"""Deployment checks, all offline: Kubernetes manifests under deploy/k8s and Dockerfiles under deploy/docker.

Each overlay is rendered with ``kubectl kustomize``; every rendered object must pass
``kubernetes-validate --strict``; YAML must be yamllint-clean. Beyond the schemas, the manifests must
agree with the code: every flag parses with the real CLI, every ``CKV_*`` variable names a config
field, the resolved config validates and matches the ports, probes and volumes around it, and the
compute servers list exactly the cache StatefulSet's pods. The ``colocated`` overlay runs both servers
in the cache pods, sharing a memory-backed socket directory; the checks find each server by its
container name wherever it runs. Only a missing ``kubectl`` (part of the machine image, not
pip-installable) skips; missing Python tools fail with the install command.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

from conftest import CacheProc
from contiguouskv.cache_server.config import CacheServerConfig
from contiguouskv.compute_server.config import ComputeServerConfig

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "deploy" / "k8s"
DOCKER = REPO / "deploy" / "docker"
OVERLAYS = ("dev", "prod", "colocated")
# Overlays that turn on TLS and bearer tokens on every server.
SECURED_OVERLAYS = ("prod", "colocated")
# The workload, (kind, name), whose pods run each server in each overlay.
WORKLOADS = {
    "dev": {"cache": ("StatefulSet", "cache"), "compute": ("Deployment", "compute")},
    "prod": {"cache": ("StatefulSet", "cache"), "compute": ("Deployment", "compute")},
    "colocated": {"cache": ("StatefulSet", "cache"), "compute": ("StatefulSet", "cache")},
}
DEV_TOOLS_INSTALL = "pip install kubernetes-validate==1.37.0 yamllint==1.38.0 (the `dev` extra)"
GPU = "nvidia.com/gpu"
# Kinds without a Kubernetes schema that kubernetes-validate may only warn about.
CRD_KINDS = {"ServiceMonitor"}
# CKV_* variables the manifests may set before a server has the field (it ignores them until then):
# variable -> why. Delete an entry once both config classes have the field.
PENDING_ENV: dict[str, str] = {}
# Memory a cache server needs beyond its DRAM cache (interpreter, gRPC buffers, in-flight records).
CACHE_MEMORY_HEADROOM = 512 << 20


@dataclasses.dataclass(frozen=True)
class Service:
    """One of our two servers as deployed: its container (and CLI subcommand) name, config class and image."""

    name: str
    config_cls: type
    health_service: str
    dockerfile: str


SERVICES = {
    "cache": Service("cache", CacheServerConfig, "contiguouskv.v1.CacheService", "cache.Dockerfile"),
    "compute": Service("compute", ComputeServerConfig, "contiguouskv.v1.ComputeService", "compute.Dockerfile"),
}
# The commands a container may run, as the `contiguouskv` argv they stand for.
COMMANDS = {("contiguouskv",): (), ("python", "-m", "contiguouskv.cache_server"): ("serve", "cache")}


# ---------------------------------------------------------------------------------------------
# Rendering and lookup


def _kubectl() -> str:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not on PATH (it ships with the machine image; it renders kustomize offline)")
    return kubectl


def _require_module(module: str) -> None:
    if importlib.util.find_spec(module) is None:
        pytest.fail(f"python module {module!r} is missing: {DEV_TOOLS_INSTALL}")


def kustomize(directory: Path) -> str:
    """``kubectl kustomize DIR`` output; fails the test with kustomize's message if it cannot render."""
    done = subprocess.run([_kubectl(), "kustomize", str(directory)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, f"kubectl kustomize {directory} failed:\n{done.stderr}"
    return done.stdout


@functools.cache
def rendered_text(overlay: str) -> str:
    return kustomize(K8S / "overlays" / overlay)


def rendered(overlay: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(rendered_text(overlay)) if doc]


def find(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    hits = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(hits) == 1, f"expected one {kind}/{name}, found {len(hits)}"
    return hits[0]


def pod_templates(objects: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    for o in objects:
        if o["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
            yield f"{o['kind']}/{o['metadata']['name']}", o["spec"]["template"]


def workload_of(objects: list[dict[str, Any]], service: Service) -> str:
    """``Kind/name`` of the one workload whose pods have a container named after the server."""
    hits = [name for name, template in pod_templates(objects)
            if any(c["name"] == service.name for c in template["spec"]["containers"])]
    assert len(hits) == 1, f"expected one workload with a container named {service.name!r}, found {hits}"
    return hits[0]


def pod_spec(objects: list[dict[str, Any]], service: Service) -> dict[str, Any]:
    kind, name = workload_of(objects, service).split("/")
    return find(objects, kind, name)["spec"]["template"]["spec"]


def main_container(objects: list[dict[str, Any]], service: Service) -> dict[str, Any]:
    containers = pod_spec(objects, service)["containers"]
    hits = [c for c in containers if c["name"] == service.name]
    assert len(hits) == 1, f"{workload_of(objects, service)} needs one container named {service.name!r}"
    return hits[0]


def run_as(pod: dict[str, Any], container: dict[str, Any]) -> tuple[int | None, int | None]:
    """The (uid, gid) the container runs as: its own securityContext, else the pod's."""
    pod_context, context = pod.get("securityContext", {}), container.get("securityContext", {})
    return (context.get("runAsUser", pod_context.get("runAsUser")),
            context.get("runAsGroup", pod_context.get("runAsGroup")))


def plain_env(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}


def port_named(container: dict[str, Any], name: str) -> int:
    """The container's port ``name``, or ``<container>-<name>`` where the pod holds two servers (port
    names are unique within a pod); exactly one of the two must exist."""
    ports = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
    hits = [n for n in (name, f"{container['name']}-{name}") if n in ports]
    assert len(hits) == 1, f"container {container['name']} needs one port named {name!r} (or prefixed): {sorted(ports)}"
    return ports[hits[0]]


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def quantity(value: str | int) -> float:
    """A Kubernetes quantity ("500m", "2", "4Gi", "3500Gi") as a number."""
    units = {"m": 1e-3, "": 1, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12,
             "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
    match = re.fullmatch(r"(\d+)([KMGT]i|[mkMGT])?", str(value))
    assert match, f"cannot read quantity {value!r}"
    return int(match[1]) * units[match[2] or ""]


# ---------------------------------------------------------------------------------------------
# The CLI and config as the containers will see them


def cli_argv(container: dict[str, Any]) -> list[str]:
    """The container's command + args as an argv of the ``contiguouskv`` command."""
    command = tuple(container.get("command", ()))
    assert command in COMMANDS, f"container {container['name']}: unexpected command {command}"
    return [*COMMANDS[command], *container.get("args", [])]


def subcommand_parser(*path: str) -> argparse.ArgumentParser:
    from contiguouskv.cli import build_parser

    parser = build_parser()
    for name in path:
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = sub.choices[name]
    return parser


def unknown_flags(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    flags = [a.split("=", 1)[0] for a in argv if a.startswith("--")]
    return [f for f in flags if f not in parser._option_string_actions]


def config_files(objects: list[dict[str, Any]], pod: dict[str, Any], container: dict[str, Any],
                 into: Path) -> dict[str, str]:
    """Write the container's ConfigMap mounts, and placeholders for the files of its Secret mounts
    (created by the operator, not by the manifests), under ``into``; returns mount path -> local directory."""
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    mounts = {}
    for mount in container.get("volumeMounts", []):
        volume = volumes.get(mount["name"], {})  # absent: a StatefulSet's volumeClaimTemplate
        if "configMap" in volume:
            data = find(objects, "ConfigMap", volume["configMap"]["name"]).get("data", {})
        elif "secret" in volume:
            items = volume["secret"].get("items")
            assert items, f"secret volume {mount['name']}: list its items so the files it holds are explicit"
            data = {item["path"]: "placeholder" for item in items}
        else:
            continue
        local = into / mount["name"]
        local.mkdir(parents=True)
        for key, text in data.items():
            (local / key).write_text(text)
        mounts[mount["mountPath"]] = str(local)
    return mounts


def resolve_config(objects: list[dict[str, Any]], service: Service, tmp_path: Path,
                   monkeypatch: pytest.MonkeyPatch) -> Any:
    """The config the server would build from the rendered flags, CKV_* env and mounted config file."""
    from contiguouskv.cache_server import server as cache_server
    from contiguouskv.compute_server import server as compute_server

    pod, container = pod_spec(objects, service), main_container(objects, service)
    mounts = config_files(objects, pod, container, tmp_path)
    argv = cli_argv(container)
    for mount_path, local in mounts.items():
        argv = [a.replace(mount_path, local) for a in argv]
    for name in [k for k in os.environ if k.startswith("CKV_")]:
        monkeypatch.delenv(name)
    for name, value in plain_env(container).items():
        for mount_path, local in mounts.items():
            value = value.replace(mount_path, local)
        monkeypatch.setenv(name, value)
    args = subcommand_parser().parse_args(argv)
    module = cache_server if service.name == "cache" else compute_server
    return module.config_from_args(args)


def path_under_mount(path: Path, container: dict[str, Any]) -> str | None:
    for mount in container.get("volumeMounts", []):
        if path.is_relative_to(mount["mountPath"]) and not mount.get("readOnly"):
            return mount["name"]
    return None


# ---------------------------------------------------------------------------------------------
# Rendering, schemas, lint


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_our_workloads(overlay: str) -> None:
    objects = rendered(overlay)
    kinds = {(o["kind"], o["metadata"]["name"]) for o in objects}
    for expected in [("StatefulSet", "cache"), ("Service", "cache-headless"), ("PodDisruptionBudget", "cache"),
                     ("Service", "compute"), ("Deployment", "otel-collector"), ("Service", "otel-collector")]:
        assert expected in kinds, f"{overlay}: {expected} missing from the rendered overlay"
    places = {name: workload_of(objects, service) for name, service in SERVICES.items()}
    assert places == {name: "/".join(where) for name, where in WORKLOADS[overlay].items()}, places
    if places["compute"] == "Deployment/compute":
        assert ("PodDisruptionBudget", "compute") in kinds, f"{overlay}: the compute Deployment has no PDB"
    else:
        assert not {("Deployment", "compute"), ("PodDisruptionBudget", "compute")} & kinds, (
            f"{overlay}: the compute servers run in {places['compute']}; a compute Deployment or PDB is left over")
    assert {o["kind"] for o in objects} >= {"ConfigMap", "Namespace"}
    namespaces = {o["metadata"].get("namespace") for o in objects if o["kind"] != "Namespace"}
    assert len(namespaces) == 1 and None not in namespaces, f"{overlay}: objects in {namespaces}"


def kubernetes_validate(path: Path) -> list[str]:
    """Run ``kubernetes-validate --strict``; returns the kinds it had no schema for (fails on errors)."""
    _require_module("kubernetes_validate")
    done = subprocess.run([sys.executable, "-m", "kubernetes_validate", "--strict", "--quiet", str(path)],
                          capture_output=True, text=True, timeout=60)
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"kubernetes-validate --strict rejected {path.name}:\n{output}"
    return re.findall(r"Couldn't find schema for kind (\S+)", output)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_rendered_objects_pass_strict_schema_validation(overlay: str, tmp_path: Path) -> None:
    path = tmp_path / f"{overlay}.yaml"
    path.write_text(rendered_text(overlay))
    assert kubernetes_validate(path) == [], f"{overlay}: objects without a schema were not validated"


def test_schema_validation_catches_an_unknown_field(tmp_path: Path) -> None:
    """The strict check is live: one misspelt field in a rendered object fails it."""
    objects = rendered("dev")
    find(objects, "Service", "cache-headless")["spec"]["publishNotReadyAdresses"] = True
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump_all(objects))
    with pytest.raises(AssertionError, match="publishNotReadyAdresses"):
        kubernetes_validate(path)


def test_yaml_is_lint_clean() -> None:
    _require_module("yamllint")
    done = subprocess.run([sys.executable, "-m", "yamllint", "--strict", "-c", str(REPO / ".yamllint"),
                           "deploy", ".yamllint"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, f"yamllint --strict deploy/:\n{done.stdout}{done.stderr}"


@pytest.mark.parametrize("overlay", SECURED_OVERLAYS)
def test_monitoring_component_targets_named_metrics_ports(overlay: str, tmp_path: Path) -> None:
    """The opt-in ServiceMonitors render on top of the overlay and each scrapes a port named on its Service."""
    root = tmp_path / "with-monitoring"
    root.mkdir()
    to_k8s = os.path.relpath(K8S, root)
    (root / "kustomization.yaml").write_text(yaml.safe_dump({
        "namespace": "contiguouskv",
        "resources": [f"{to_k8s}/overlays/{overlay}"],
        "components": [f"{to_k8s}/components/monitoring"],
    }))
    text = kustomize(root)
    (tmp_path / "rendered.yaml").write_text(text)
    assert set(kubernetes_validate(tmp_path / "rendered.yaml")) <= CRD_KINDS
    objects = [o for o in yaml.safe_load_all(text) if o]
    monitors = [o for o in objects if o["kind"] == "ServiceMonitor"]
    assert {m["metadata"]["name"] for m in monitors} == {"cache", "compute", "otel-collector"}
    services = [o for o in objects if o["kind"] == "Service"]
    for monitor in monitors:
        matched = [s for s in services if selects(monitor["spec"]["selector"]["matchLabels"], s["metadata"]["labels"])]
        assert matched, f"ServiceMonitor/{monitor['metadata']['name']} selects no Service"
        for endpoint in monitor["spec"]["endpoints"]:
            for service in matched:
                names = {p["name"] for p in service["spec"]["ports"]}
                assert endpoint["port"] in names, f"Service/{service['metadata']['name']} has no {endpoint['port']}"


# ---------------------------------------------------------------------------------------------
# The manifests agree with the code


@pytest.mark.parametrize("overlay", OVERLAYS)
@pytest.mark.parametrize("name", SERVICES)
def test_every_flag_exists_in_the_cli(overlay: str, name: str) -> None:
    service = SERVICES[name]
    container = main_container(rendered(overlay), service)
    argv = cli_argv(container)
    assert argv[:2] == ["serve", name], f"{name} container runs {argv[:2]}, not `serve {name}`"
    parser = subcommand_parser("serve", name)
    assert unknown_flags(parser, argv[2:]) == [], f"flags not in `contiguouskv serve {name}`"
    parser.parse_args(argv[2:])  # values parse too (types, choices)
    if tuple(container["command"]) == ("python", "-m", "contiguouskv.cache_server"):
        from contiguouskv.cache_server.server import add_arguments

        module_parser = argparse.ArgumentParser()
        add_arguments(module_parser)
        assert unknown_flags(module_parser, argv[2:]) == [], "flags not in `python -m contiguouskv.cache_server`"


def check_ckv_names(names: set[str], config_cls: type, where: str) -> None:
    fields = {f.name for f in dataclasses.fields(config_cls)}
    unknown = {n for n in names if n.startswith("CKV_") and n not in PENDING_ENV
               and n.removeprefix("CKV_").lower() not in fields}
    assert not unknown, f"{where}: {sorted(unknown)} name no field of {config_cls.__name__}"


@pytest.mark.parametrize("overlay", OVERLAYS)
@pytest.mark.parametrize("name", SERVICES)
def test_every_ckv_variable_names_a_config_field(overlay: str, name: str) -> None:
    service = SERVICES[name]
    container = main_container(rendered(overlay), service)
    names = {e["name"] for e in container.get("env", [])}
    check_ckv_names(names, service.config_cls, f"{overlay} {name} container")
    assert not container.get("envFrom"), "envFrom hides which CKV_* variables are set; list them in env"
    assert pod_spec(rendered(overlay), service).get("enableServiceLinks") is False, (
        "service links put <SERVICE>_* variables into the pod; a Service named ckv-* would set CKV_*")


@pytest.mark.parametrize("overlay", OVERLAYS)
@pytest.mark.parametrize("name", SERVICES)
def test_resolved_config_matches_ports_probes_and_volumes(overlay: str, name: str, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    service = SERVICES[name]
    objects = rendered(overlay)
    config = resolve_config(objects, service, tmp_path, monkeypatch)
    container, pod = main_container(objects, service), pod_spec(objects, service)
    assert config.host == "0.0.0.0", "the server must listen on the pod IP, not loopback"
    assert port_named(container, "grpc") == config.port
    if hasattr(config, "metrics_port"):  # servers without the field yet only declare the port
        assert config.metrics_port == port_named(container, "metrics"), f"{name}: metrics_port"
    port_named(container, "metrics")
    probe_port = config.health_port if config.health_port is not None else config.port
    if config.health_port is not None:
        assert port_named(container, "health") == config.health_port
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        check = container[probe].get("grpc")
        assert check == {"port": probe_port, "service": service.health_service}, f"{name} {probe}: {check}"
    if config.tls_cert_file is not None:
        assert config.health_port is not None, f"{name}: kubelet gRPC probes cannot speak TLS; set a health port"
    assert config.grace_seconds < pod["terminationGracePeriodSeconds"], "the drain must end before SIGKILL"
    writable = config.root if name == "cache" else config.resolved_cache_dir()
    mount = path_under_mount(Path(writable), container)
    assert mount == ("store" if name == "cache" else "model-cache"), f"{name}: {writable} is on {mount}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_compute_lists_exactly_the_cache_pods(overlay: str) -> None:
    objects = rendered(overlay)
    statefulset = find(objects, "StatefulSet", "cache")
    headless = find(objects, "Service", statefulset["spec"]["serviceName"])
    assert headless["spec"]["clusterIP"] == "None", "pod DNS names need a headless Service"
    port = next(p["port"] for p in headless["spec"]["ports"] if p["name"] == "grpc")
    assert port == port_named(main_container(objects, SERVICES["cache"]), "grpc")
    pods = [f"cache-{i}.{headless['metadata']['name']}:{port}" for i in range(statefulset["spec"]["replicas"])]
    listed = plain_env(main_container(objects, SERVICES["compute"]))["CKV_CACHE"].split(",")
    assert listed == pods, f"{overlay}: CKV_CACHE must list every cache pod, in order"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_selectors_and_target_ports_meet_pods(overlay: str) -> None:
    objects = rendered(overlay)
    templates = list(pod_templates(objects))
    for name, template in templates:
        owner = next(o for o in objects if f"{o['kind']}/{o['metadata']['name']}" == name)
        assert selects(owner["spec"]["selector"]["matchLabels"], template["metadata"]["labels"]), name
    budgets: dict[str, list[str]] = {name: [] for name, _ in templates}
    for o in objects:
        if o["kind"] not in ("Service", "PodDisruptionBudget"):
            continue
        selector = o["spec"]["selector"]
        selector = selector.get("matchLabels", selector) if o["kind"] == "PodDisruptionBudget" else selector
        matched = [(n, t) for n, t in templates if selects(selector, t["metadata"]["labels"])]
        assert len(matched) == 1, f"{o['kind']}/{o['metadata']['name']} selects {len(matched)} workloads"
        if o["kind"] == "PodDisruptionBudget":
            budgets[matched[0][0]].append(o["metadata"]["name"])
            continue
        # A Service reaches the container named after its component, even in a pod that holds two.
        component = o["metadata"]["labels"]["app.kubernetes.io/component"]
        containers = [c for c in matched[0][1]["spec"]["containers"] if c["name"] == component]
        assert len(containers) == 1, f"Service/{o['metadata']['name']}: {matched[0][0]} has no container {component!r}"
        port_names = {p["name"] for p in containers[0].get("ports", [])}
        for port in o["spec"].get("ports", []):
            assert port["targetPort"] in port_names, (
                f"Service/{o['metadata']['name']}: {port['targetPort']} is not a port of container {component}")
    for name, names in budgets.items():
        assert len(names) <= 1, f"{name} is under PodDisruptionBudgets {names}: the eviction API refuses such pods"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_ports_are_unique_within_each_pod(overlay: str) -> None:
    """Containers of a pod share its network namespace: no two may declare one port number or name."""
    for name, template in pod_templates(rendered(overlay)):
        ports = [p for c in template["spec"]["containers"] for p in c.get("ports", [])]
        numbers = [p["containerPort"] for p in ports]
        names = [p["name"] for p in ports if "name" in p]
        assert len(numbers) == len(set(numbers)), f"{name}: a port number is declared twice: {sorted(numbers)}"
        assert len(names) == len(set(names)), f"{name}: a port name is declared twice: {sorted(names)}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_cache_shards_are_spread_budgeted_and_fit_their_volume(overlay: str) -> None:
    objects = rendered(overlay)
    statefulset = find(objects, "StatefulSet", "cache")
    labels = statefulset["spec"]["template"]["metadata"]["labels"]
    terms = statefulset["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"][
        "requiredDuringSchedulingIgnoredDuringExecution"]
    assert any(t["topologyKey"] == "kubernetes.io/hostname" and selects(t["labelSelector"]["matchLabels"], labels)
               for t in terms), "cache shards need required anti-affinity across nodes"
    assert find(objects, "PodDisruptionBudget", "cache")["spec"]["maxUnavailable"] == 1
    claim = statefulset["spec"]["volumeClaimTemplates"][0]
    assert claim["metadata"]["name"] == "store"
    size = quantity(claim["spec"]["resources"]["requests"]["storage"])
    config = json.loads(next(iter(find_config_map(objects, statefulset, "cache-config").values())))
    assert 0 < config["max_store_bytes"] <= size, f"{overlay}: max_store_bytes must be set and fit the volume"
    if overlay != "dev":
        assert claim["spec"]["storageClassName"] == "local-nvme"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_cache_memory_limit_holds_its_dram_cache(overlay: str, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    objects = rendered(overlay)
    config = resolve_config(objects, SERVICES["cache"], tmp_path, monkeypatch)
    limit = quantity(main_container(objects, SERVICES["cache"])["resources"]["limits"]["memory"])
    dram = getattr(config, "dram_cache_bytes", 0)  # a field of newer cache servers
    assert limit >= dram + CACHE_MEMORY_HEADROOM, f"{overlay}: {limit:.0f} B limit, {dram} B DRAM cache"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_container_requests_what_it_may_use(overlay: str) -> None:
    for name, template in pod_templates(rendered(overlay)):
        for container in template["spec"]["containers"]:
            requests = container["resources"]["requests"]
            limits = container["resources"]["limits"]
            assert {"cpu", "memory"} <= set(requests) and "memory" in limits, f"{name}: {container['resources']}"
            for resource in set(requests) & set(limits):
                assert quantity(requests[resource]) <= quantity(limits[resource]), f"{name}: {resource}"


def find_config_map(objects: list[dict[str, Any]], workload: dict[str, Any], prefix: str) -> dict[str, str]:
    volumes = workload["spec"]["template"]["spec"]["volumes"]
    name = next(v["configMap"]["name"] for v in volumes if v.get("configMap", {}).get("name", "").startswith(prefix))
    return find(objects, "ConfigMap", name)["data"]


def gpu_counts(objects: list[dict[str, Any]]) -> dict[str, list[Any]]:
    counts: dict[str, list[Any]] = {}
    for name, template in pod_templates(objects):
        for container in template["spec"]["containers"]:
            resources = container.get("resources", {})
            found = [resources.get(part, {}).get(GPU) for part in ("requests", "limits")]
            counts[f"{name}/{container['name']}"] = [c for c in found if c is not None]
    return counts


def test_dev_requests_no_gpu_and_computes_on_cpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    objects = rendered("dev")
    assert all(not c for c in gpu_counts(objects).values()), f"dev asks for a GPU: {gpu_counts(objects)}"
    config = resolve_config(objects, SERVICES["compute"], tmp_path, monkeypatch)
    assert (config.device, config.model) == ("cpu", "smollm2-135m-instruct")
    assert find(objects, "StatefulSet", "cache")["spec"]["replicas"] == 1
    assert main_container(objects, SERVICES["compute"])["image"].endswith("-cpu")


def test_prod_gives_each_compute_server_one_gpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    objects = rendered("prod")
    counts = gpu_counts(objects)
    assert [int(c) for c in counts["Deployment/compute/compute"]] == [1, 1], "compute: request and limit 1 GPU"
    assert all(not c for k, c in counts.items() if k != "Deployment/compute/compute"), counts
    config = resolve_config(objects, SERVICES["compute"], tmp_path, monkeypatch)
    assert config.device == "cuda"
    assert find(objects, "StatefulSet", "cache")["spec"]["replicas"] >= 3
    assert find(objects, "Deployment", "compute")["spec"]["replicas"] >= 2


def mount_holding(container: dict[str, Any], path: PurePosixPath) -> dict[str, Any]:
    """The container's volume mount that ``path`` lies strictly under (the deepest, which wins)."""
    under = [m for m in container.get("volumeMounts", [])
             if path != PurePosixPath(m["mountPath"]) and path.is_relative_to(m["mountPath"])]
    assert under, f"container {container['name']}: {path} is on no volume"
    return max(under, key=lambda m: len(PurePosixPath(m["mountPath"]).parts))


def test_colocated_servers_share_a_memory_backed_socket_volume_and_one_uid(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Both servers in one pod; the cache's shm_socket is the compute's, on one memory-backed volume
    mounted at one path in both; the compute uses the plane (auto or shm); both run as one uid and gid."""
    objects = rendered("colocated")
    cache, compute = SERVICES["cache"], SERVICES["compute"]
    assert workload_of(objects, cache) == workload_of(objects, compute), "the two servers run in different pods"
    pod = pod_spec(objects, cache)
    cache_config = resolve_config(objects, cache, tmp_path / "cache", monkeypatch)
    compute_config = resolve_config(objects, compute, tmp_path / "compute", monkeypatch)
    assert compute_config.data_path in ("auto", "shm"), f"compute data_path {compute_config.data_path!r}"
    assert cache_config.shm_socket, "the cache server opens no shm_socket"
    assert cache_config.shm_socket == compute_config.shm_socket, (cache_config.shm_socket, compute_config.shm_socket)
    socket = PurePosixPath(cache_config.shm_socket)
    assert socket.is_absolute(), f"shm_socket {socket} is relative to each container's working directory"

    mounts = {c["name"]: mount_holding(c, socket) for c in (main_container(objects, cache),
                                                              main_container(objects, compute))}
    assert len({(m["name"], m["mountPath"]) for m in mounts.values()}) == 1, f"different mounts: {mounts}"
    assert not any("subPath" in m or "subPathExpr" in m for m in mounts.values()), f"a subPath splits it: {mounts}"
    assert not mounts["cache"].get("readOnly"), "the cache server creates the socket: its mount must be writable"
    volume = next(v for v in pod["volumes"] if v["name"] == mounts["cache"]["name"])
    assert set(volume) == {"name", "emptyDir"} and volume["emptyDir"].get("medium") == "Memory", volume

    ids = {name: run_as(pod, main_container(objects, SERVICES[name])) for name in SERVICES}
    assert len(set(ids.values())) == 1, f"the socket accepts only its own uid; (uid, gid): {ids}"
    uid, gid = ids["cache"]
    assert uid and gid and pod["securityContext"].get("fsGroup") == gid, (uid, gid, pod["securityContext"])
    for name in SERVICES:  # stated on each container, so a pod-level change cannot split them
        context = main_container(objects, SERVICES[name])["securityContext"]
        assert (context.get("runAsUser"), context.get("runAsGroup")) == (uid, gid), f"{name}: {context}"

    counts = gpu_counts(objects)
    assert [int(c) for c in counts["StatefulSet/cache/compute"]] == [1, 1], "compute: request and limit 1 GPU"
    assert all(not c for k, c in counts.items() if k != "StatefulSet/cache/compute"), counts
    assert compute_config.device == "cuda"
    # The shared buffer is a memfd the compute server creates: charged to its container's memory.
    limit = quantity(main_container(objects, compute)["resources"]["limits"]["memory"])
    assert limit > compute_config.shm_slots * compute_config.shm_slot_bytes, "the shared buffer exceeds the limit"
    # The compute container is added by the colocated overlay itself: its image must still be prod's.
    prod = rendered("prod")
    for service in SERVICES.values():
        assert main_container(objects, service)["image"] == main_container(prod, service)["image"], service.name


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pods_run_as_the_image_user(overlay: str) -> None:
    for name, template in pod_templates(rendered(overlay)):
        context = template["spec"]["securityContext"]
        assert context.get("runAsNonRoot") is True and context.get("runAsUser", 0) > 0, name
        for container in template["spec"]["containers"]:
            assert container["securityContext"]["allowPrivilegeEscalation"] is False, name
    for service in SERVICES.values():
        objects = rendered(overlay)
        uid, _ = run_as(pod_spec(objects, service), main_container(objects, service))
        assert dockerfile_user(service.dockerfile) == str(uid), f"{service.name}: image user != runAsUser"


# ---------------------------------------------------------------------------------------------
# Dockerfiles


def dockerfile_instructions(name: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, rest) pairs of a Dockerfile, continuation lines joined, comments dropped."""
    text = (DOCKER / name).read_text()
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    return [(parts[0].upper(), parts[1] if len(parts) > 1 else "")
            for parts in (line.strip().split(None, 1) for line in joined.splitlines() if line.strip())]


def dockerfile_user(name: str) -> str:
    users = [rest for op, rest in dockerfile_instructions(name) if op == "USER"]
    assert users, f"{name}: no USER instruction (the image would run as root)"
    return users[-1].split(":")[0]


def healthcheck_code(name: str) -> str:
    checks = [rest for op, rest in dockerfile_instructions(name) if op == "HEALTHCHECK"]
    assert len(checks) == 1, f"{name}: expected one HEALTHCHECK"
    command = json.loads(checks[0].split(" CMD ", 1)[1])
    assert command[:2] == ["python", "-c"], f"{name}: HEALTHCHECK should be python -c with grpc_health"
    return command[2]


@pytest.mark.parametrize("name", SERVICES)
def test_dockerfile_runs_as_non_root_with_a_grpc_health_check(name: str) -> None:
    service = SERVICES[name]
    user = dockerfile_user(service.dockerfile)
    assert user.isdigit() and int(user) > 0, f"{service.dockerfile}: USER {user} (numeric, non-root)"
    code = healthcheck_code(service.dockerfile)
    assert "grpc_health" in code and repr(service.health_service) in code
    env_names = {pair.split("=", 1)[0] for op, rest in dockerfile_instructions(service.dockerfile)
                 if op == "ENV" for pair in shlex.split(rest)}
    check_ckv_names(env_names, service.config_cls, service.dockerfile)


def test_compute_dockerfile_has_a_cuda_base_and_a_cpu_variant() -> None:
    instructions = dockerfile_instructions("compute.Dockerfile")
    args = dict(rest.split("=", 1) for op, rest in instructions if op == "ARG" and "=" in rest)
    assert args["BASE_IMAGE"].startswith("nvidia/cuda:"), "the default base image is CUDA"
    assert "TORCH_INDEX_URL" in args, "a build arg selects the CPU torch build"
    assert ("FROM", "${BASE_IMAGE}") in instructions
    runs = [rest for op, rest in instructions if op == "RUN"]
    torch_first = next(i for i, r in enumerate(runs) if "torch==2.13.0" in r)
    assert torch_first < next(i for i, r in enumerate(runs) if "[compute" in r), "pin torch before the extra"


def test_cache_image_command_runs_without_torch() -> None:
    """The cache image installs no torch; its entrypoint must still start (here: print its help)."""
    entry = [json.loads(rest) for op, rest in dockerfile_instructions("cache.Dockerfile") if op == "ENTRYPOINT"]
    assert entry == [["python", "-m", "contiguouskv.cache_server"]]
    blocker = (
        "import runpy, sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.partition('.')[0] in ('torch', 'transformers'):\n"
        "            raise ImportError('no ' + name + ' in the cache image')\n"
        "sys.meta_path.insert(0, Block())\n"
        "sys.argv = ['cache', '--help']\n"
        "runpy.run_module('contiguouskv.cache_server', run_name='__main__')\n"
    )
    done = subprocess.run([sys.executable, "-c", blocker], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "--root" in done.stdout, done.stderr


def run_healthcheck(code: str, port: int) -> int:
    env = {**os.environ, "CKV_PORT": str(port)}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, timeout=60).returncode


def test_healthchecks_ask_the_grpc_health_service(cache_server: CacheProc) -> None:
    """The cache image's check passes against a live cache server; the compute one (other service) fails."""
    assert run_healthcheck(healthcheck_code("cache.Dockerfile"), cache_server.port) == 0
    assert run_healthcheck(healthcheck_code("compute.Dockerfile"), cache_server.port) != 0
    assert cache_server.stop() == 0
    assert run_healthcheck(healthcheck_code("cache.Dockerfile"), cache_server.port) != 0


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_prod_turns_on_tls_and_tokens_everywhere_dev_leaves_them_off(overlay: str, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    objects = rendered(overlay)
    cache = resolve_config(objects, SERVICES["cache"], tmp_path / "cache", monkeypatch)
    compute = resolve_config(objects, SERVICES["compute"], tmp_path / "compute", monkeypatch)
    secured = [cache.tls_cert_file, cache.tls_client_ca_file, cache.auth_tokens_file, compute.tls_cert_file,
               compute.auth_tokens_file, compute.cache_tls_ca_file, compute.cache_tls_cert_file,
               compute.cache_token_file]
    if overlay in SECURED_OVERLAYS:
        assert all(path is not None for path in secured), secured
    else:
        assert secured == [None] * len(secured)
