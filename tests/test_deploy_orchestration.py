"""Static checks of the orchestration files: the Swarm stack (deploy/stack.yml) and its
proxy, the Kubernetes manifests (deploy/k8s, rendered by kubectl kustomize) and the deploy
scripts, each against the Dockerfile, docker-compose.yml and the app's settings."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy_files import (
    CI_RUN,
    K8S,
    MAKEFILE,
    NGINX_CONF,
    PROXY_DOCKERFILE,
    ROOT,
    STACK,
    THREAD_VARS,
    Instruction,
    app_env,
    default_of,
    dockerfile_probe,
    dockerfile_uid,
    exposed_ports,
    kustomize,
    only,
    probe_path,
    seconds,
)

# -- Swarm stack (deploy/stack.yml) and its proxy -------------------------------------------


@pytest.fixture(scope="module")
def stack() -> dict[str, Any]:
    """deploy/stack.yml, parsed."""
    doc = yaml.safe_load(STACK.read_text())
    assert isinstance(doc, dict) and {"api", "proxy"} <= set(doc["services"])
    return doc


def test_stack_api_matches_compose_and_dockerfile(
    stack: dict[str, Any], compose_api: dict[str, Any], dockerfile: list[Instruction]
) -> None:
    api = stack["services"]["api"]
    assert default_of(api["image"]) == compose_api["image"], "the stack runs another image"
    assert app_env(api["environment"]) == app_env(compose_api["environment"])
    assert api["healthcheck"]["test"][1:] == dockerfile_probe(dockerfile)
    assert seconds(api["healthcheck"]["start_period"]) >= 60
    assert "ports" not in api, "replicas are reached through the proxy, not published"
    assert api["read_only"] is True and api["cap_drop"] == ["ALL"]
    assert "tmpfs" not in api, "stack deploy ignores the short tmpfs form"
    assert {"type": "tmpfs", "target": "/tmp"}.items() <= api["volumes"][0].items()


def test_stack_rolls_out_start_first_behind_dns_round_robin(stack: dict[str, Any]) -> None:
    deploy = stack["services"]["api"]["deploy"]
    assert deploy["endpoint_mode"] == "dnsrr", "the routing mesh needs IPVS (see stack.yml)"
    assert int(default_of(str(deploy["replicas"]))) >= 2
    update = deploy["update_config"]
    assert update["order"] == "start-first" and update["failure_action"] == "rollback"
    assert deploy["rollback_config"]["order"] == "start-first"
    assert seconds(stack["services"]["api"]["stop_grace_period"]) >= 10


def test_stack_cpu_limit_and_thread_counts_agree(stack: dict[str, Any]) -> None:
    api = stack["services"]["api"]
    cpus = float(api["deploy"]["resources"]["limits"]["cpus"])
    assert cpus.is_integer(), "a whole number of CPUs per replica"
    assert [int(api["environment"][name]) for name in THREAD_VARS] == [int(cpus)] * len(THREAD_VARS)


def test_proxy_publishes_in_host_mode_and_forwards_to_the_api_port(
    stack: dict[str, Any], dockerfile: list[Instruction]
) -> None:
    from app.settings import Settings

    proxy = stack["services"]["proxy"]
    [port] = proxy["ports"]
    assert port["mode"] == "host", "ingress (mesh) publishing needs IPVS"
    assert default_of(str(port["published"])) == str(next(iter(exposed_ports(dockerfile))))
    conf = NGINX_CONF.read_text()
    assert re.search(rf"^\s*listen {port['target']};", conf, flags=re.MULTILINE)
    assert f"EXPOSE {port['target']}" in PROXY_DOCKERFILE.read_text()
    [upstream] = re.findall(r"set \$api (\S+);", conf)
    assert upstream == f"api:{next(iter(exposed_ports(dockerfile)))}"
    assert re.search(r"resolver 127\.0\.0\.11 valid=\d+s", conf), "re-resolve the replicas"
    assert "non_idempotent" in conf, "a stopping replica's POSTs must go to another one"
    [body_limit] = re.findall(r"client_max_body_size (\d+)m;", conf)
    settings = Settings()
    assert int(body_limit) * 1024 * 1024 > settings.max_batch_bytes >= settings.max_upload_bytes
    assert proxy["read_only"] is True and proxy["volumes"][0]["target"] == "/tmp"


# -- Kubernetes (deploy/k8s) ----------------------------------------------------------------


@pytest.fixture(scope="module")
def k8s() -> dict[str, dict[str, Any]]:
    """The ingress overlay (base + Ingress) rendered, by kind."""
    docs = kustomize(K8S / "ingress")
    by_kind = {doc["kind"]: doc for doc in docs}
    assert len(by_kind) == len(docs), "one object of each kind"
    return by_kind


@pytest.mark.parametrize("folder", ["base", "ingress"])
def test_kustomize_renders_valid_kubernetes_objects(folder: str) -> None:
    import kubernetes_validate

    docs = kustomize(K8S / folder)
    kinds = {doc["kind"] for doc in docs}
    expected = {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget"}
    assert kinds == expected | ({"Ingress"} if folder == "ingress" else set()), kinds
    for doc in docs:
        kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)
    broken = dict(docs[0], spec={"nonsense": 1})  # the validator does reject a bad object
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, kubernetes_validate.latest_version(), strict=True)


def test_k8s_container_matches_dockerfile_and_compose(
    k8s: dict[str, dict[str, Any]],
    compose_api: dict[str, Any],
    stack: dict[str, Any],
    dockerfile: list[Instruction],
) -> None:
    pod = k8s["Deployment"]["spec"]["template"]["spec"]
    [container] = pod["containers"]
    port = next(iter(exposed_ports(dockerfile)))
    assert [p["containerPort"] for p in container["ports"]] == [port]
    assert container["image"] == compose_api["image"], "image and tag as in docker-compose.yml"
    assert pod["securityContext"]["runAsUser"] == dockerfile_uid(dockerfile)
    assert pod["securityContext"]["runAsNonRoot"] is True
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    [mount] = container["volumeMounts"]
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    assert mount["mountPath"] == "/tmp" and "emptyDir" in volume

    env = {e["name"]: e["value"] for e in container["env"]}
    assert app_env(env) == app_env(compose_api["environment"])
    assert {k: env[k] for k in THREAD_VARS} == {
        k: stack["services"]["api"]["environment"][k] for k in THREAD_VARS
    }
    limits = container["resources"]["limits"]
    assert [int(env[name]) for name in THREAD_VARS] == [int(limits["cpu"])] * len(THREAD_VARS)
    assert container["resources"]["requests"]["cpu"] == limits["cpu"], "no CPU overcommit"


def test_k8s_probes_use_the_dockerfile_probe_and_live_routes(
    k8s: dict[str, dict[str, Any]], dockerfile: list[Instruction]
) -> None:
    from app.main import create_app
    from app.settings import Settings

    [container] = k8s["Deployment"]["spec"]["template"]["spec"]["containers"]
    ready_path = probe_path(dockerfile_probe(dockerfile))
    assert container["readinessProbe"]["httpGet"]["path"] == ready_path
    assert container["startupProbe"]["httpGet"]["path"] == ready_path
    routes = create_app(Settings(model_dir=ROOT / "models" / "default")).openapi()["paths"]
    live = container["livenessProbe"]["httpGet"]["path"]
    assert live in routes and live != ready_path, "liveness must not depend on the model"
    startup = container["startupProbe"]
    start_budget = startup["periodSeconds"] * startup["failureThreshold"]
    flags = dict(
        f.removeprefix("--").split("=", 1) for f in only(dockerfile, "HEALTHCHECK")[0].flags
    )
    assert start_budget >= seconds(flags["start-period"]), "the start-up probe allows less time"
    named = {p["name"] for p in container["ports"]}
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert container[probe]["httpGet"]["port"] in named


def test_k8s_service_hpa_pdb_and_ingress_select_the_deployment(
    k8s: dict[str, dict[str, Any]],
) -> None:
    deployment = k8s["Deployment"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    strategy = deployment["spec"]["strategy"]["rollingUpdate"]
    assert strategy["maxUnavailable"] == 0, "roll out start-first, like the Swarm stack"
    service = k8s["Service"]
    assert service["spec"]["selector"].items() <= labels.items()
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    assert service["spec"]["ports"][0]["targetPort"] in {p["name"] for p in container["ports"]}
    target = k8s["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    assert k8s["HorizontalPodAutoscaler"]["spec"]["minReplicas"] >= 2
    pdb = k8s["PodDisruptionBudget"]["spec"]
    assert pdb["selector"]["matchLabels"].items() <= labels.items()
    assert pdb["minAvailable"] < k8s["HorizontalPodAutoscaler"]["spec"]["minReplicas"]
    ingress = k8s["Ingress"]
    backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend["name"] == service["metadata"]["name"]
    from app.settings import Settings

    limit = ingress["metadata"]["annotations"]["nginx.ingress.kubernetes.io/proxy-body-size"]
    assert int(limit.removesuffix("m")) * 1024 * 1024 > Settings().max_batch_bytes


# -- scripts --------------------------------------------------------------------------------


def test_ci_runs_make_docker_test_after_make_test() -> None:
    commands = [ln.strip() for ln in CI_RUN.read_text().splitlines() if ln.strip()]
    commands = [c for c in commands if not c.startswith("#")]
    assert commands.index("make docker-test") > commands.index("make test")
    recipe = re.search(r"^docker-test:.*\n\t(.+)$", MAKEFILE.read_text(), flags=re.MULTILINE)
    assert recipe and "deploy/docker-test.sh" in recipe.group(1)


@pytest.mark.parametrize("script", sorted((ROOT / "deploy").glob("*.sh")), ids=lambda p: p.name)
def test_shell_scripts_are_strict_and_parse(script: Path) -> None:
    assert "set -euo pipefail" in script.read_text()
    done = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr


def test_docker_test_driver_is_typed() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-incremental", "deploy/dockertest.py"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout
