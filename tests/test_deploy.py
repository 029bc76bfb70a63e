"""Static checks of the container files against the repository and the app.

No Docker engine is needed: the Dockerfile, docker-compose.yml, .dockerignore, the Makefile,
.ci/run and the README are parsed and cross-checked, and the health probe command that the
image runs is executed for real against a live test server. The Swarm stack and the
Kubernetes manifests are checked in test_deploy_orchestration.py.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.deploy_files import (
    CI_RUN,
    COMPOSE,
    DOCKERFILE,
    MAKEFILE,
    README,
    ROOT,
    SERVING_PATHS,
    Instruction,
    compose_probe,
    copy_sources,
    dockerfile_env,
    dockerfile_probe,
    dockerignore_patterns,
    exposed_ports,
    ignored,
    makefile_run_command,
    only,
    probe_path,
    seconds,
)

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
