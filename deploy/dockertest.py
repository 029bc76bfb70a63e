"""Live checks of the Docker image, the compose service and the Swarm stack.

Run by ``deploy/docker-test.sh`` (``make docker-test``) against real containers; standard
library only, so it runs with any Python 3.11. Every wait is bounded and every failure raises
:class:`CheckFailed` with a one-line reason, printed as ``FAIL: ...`` (exit status 1).

    python deploy/dockertest.py smoke --url http://127.0.0.1:8000 --container NAME
    python deploy/dockertest.py swarm --url http://127.0.0.1:8000 --stack triage
    python deploy/dockertest.py bench --url http://127.0.0.1:8000 --stack triage
"""

from __future__ import annotations

import argparse
import http.client
import json
import math
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PHOTO = ROOT / "tests" / "fixtures" / "images" / "isic2017_melanoma_ISIC_0000002.jpg"
BOUNDARY = "triage-docker-test-boundary"


class CheckFailed(Exception):
    """A live check failed; the message is the one-line reason."""


def check(condition: bool, reason: str) -> None:
    """Raise :class:`CheckFailed` with ``reason`` unless ``condition`` holds."""
    if not condition:
        raise CheckFailed(reason)


def log(message: str) -> None:
    """Progress line on stderr (stdout carries only the figures)."""
    print(f"[dockertest {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# -- docker CLI -----------------------------------------------------------------------------


def docker(*args: str, timeout: float = 60, ok: bool = True) -> str:
    """Run ``docker ARGS`` with a timeout; its stdout, or CheckFailed when it fails."""
    try:
        done = subprocess.run(
            ["docker", *args], capture_output=True, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise CheckFailed(f"`docker {' '.join(args)}` took longer than {timeout:.0f} s") from exc
    if ok and done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise CheckFailed(f"`docker {' '.join(args[:3])} ...` failed: {last}")
    return done.stdout.strip()


def service_containers(service: str, healthy_only: bool = True) -> list[str]:
    """IDs of this node's running containers of a Swarm service (healthy ones by default)."""
    args = ["ps", "-q", "--filter", f"label=com.docker.swarm.service.name={service}"]
    if healthy_only:
        args += ["--filter", "health=healthy"]
    return docker(*args).split()


def container_ip(container: str) -> str:
    """The container's address on its (first) non-ingress network."""
    networks = json.loads(docker("inspect", "-f", "{{json .NetworkSettings.Networks}}", container))
    addresses = [v["IPAddress"] for k, v in networks.items() if k != "ingress" and v["IPAddress"]]
    check(bool(addresses), f"container {container[:12]} has no network address")
    return str(addresses[0])


def wait_for(what: str, predicate: Callable[[], bool], timeout: float, every: float = 2) -> float:
    """Poll ``predicate`` until true; the seconds it took, or CheckFailed after ``timeout``."""
    start = time.monotonic()
    while True:
        if predicate():
            return time.monotonic() - start
        if time.monotonic() - start > timeout:
            raise CheckFailed(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)


def wait_healthy(service: str, replicas: int, timeout: float) -> float:
    """Wait until exactly ``replicas`` healthy containers run and Swarm reports no others."""

    def converged() -> bool:
        healthy = service_containers(service)
        running = service_containers(service, healthy_only=False)
        return len(healthy) == replicas and len(running) == replicas

    return wait_for(f"{replicas} healthy replicas of {service}", converged, timeout)


# -- HTTP -----------------------------------------------------------------------------------


@dataclass
class Reply:
    """One HTTP answer."""

    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> dict[str, object]:
        """The body parsed as a JSON object."""
        value = json.loads(self.body)
        assert isinstance(value, dict)
        return value


def multipart(filename: str, content: bytes, content_type: str = "image/jpeg") -> bytes:
    """A multipart/form-data body with one file in the field ``file``."""
    head = (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; '
        f'filename="{filename}"\r\nContent-Type: {content_type}\r\n\r\n'
    ).encode()
    return head + content + f"\r\n--{BOUNDARY}--\r\n".encode()


def request(
    url: str,
    method: str = "GET",
    body: bytes | None = None,
    timeout: float = 60,
    connection: http.client.HTTPConnection | None = None,
) -> Reply:
    """One request; multipart bodies get the matching Content-Type. Raises OSError."""
    parts = urllib.parse.urlsplit(url)
    conn = connection or http.client.HTTPConnection(parts.netloc, timeout=timeout)
    headers = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"} if body else {}
    path = parts.path + (f"?{parts.query}" if parts.query else "")
    try:
        conn.request(method, path or "/", body=body, headers=headers)
        answer = conn.getresponse()
        return Reply(answer.status, {k.lower(): v for k, v in answer.getheaders()}, answer.read())
    finally:
        if connection is None:
            conn.close()


def get_ok(url: str) -> bool:
    """Whether GET ``url`` answers 200 (False on any error)."""
    try:
        return request(url, timeout=5).status == 200
    except OSError:
        return False


# -- load -----------------------------------------------------------------------------------


@dataclass
class LoadResult:
    """What a load run saw: answers per status, errors, the replicas that answered."""

    statuses: Counter[int] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    upstreams: Counter[str] = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def failed(self) -> int:
        """Requests that did not get a 200 (transport errors included)."""
        return sum(n for status, n in self.statuses.items() if status != 200) + sum(
            self.errors.values()
        )

    @property
    def retried(self) -> int:
        """Requests nginx passed to a second replica after the first failed (``a, b``)."""
        return sum(n for upstream, n in self.upstreams.items() if "," in upstream)

    @property
    def ok(self) -> int:
        """Requests answered 200."""
        return self.statuses[200]

    def summary(self) -> str:
        """One line for the log."""
        lat = sorted(self.latencies) or [math.nan]
        rate = self.ok / self.seconds if self.seconds else math.nan
        return (
            f"{self.ok} ok, {self.failed} failed {dict(self.errors) or ''}"
            f"{dict(self.statuses)} in {self.seconds:.1f} s = {rate:.2f} req/s, "
            f"p50 {lat[len(lat) // 2]:.2f} s, p95 {lat[int(len(lat) * 0.95)]:.2f} s, "
            f"replicas {dict(self.upstreams)}"
        )


class Load:
    """``concurrency`` clients posting a real photo to /predict until stopped."""

    def __init__(self, base_url: str, concurrency: int) -> None:
        self.url = f"{base_url}/predict?explain=false"
        self.body = multipart(PHOTO.name, PHOTO.read_bytes())
        self.result = LoadResult()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._client) for _ in range(concurrency)]
        self._started = 0.0

    def _client(self) -> None:
        netloc = urllib.parse.urlsplit(self.url).netloc
        conn = http.client.HTTPConnection(netloc, timeout=60)
        while not self._stop.is_set():
            start = time.monotonic()
            try:
                reply = request(self.url, "POST", self.body, connection=conn)
            except (OSError, http.client.HTTPException) as exc:
                conn.close()
                conn = http.client.HTTPConnection(netloc, timeout=60)
                with self._lock:
                    self.result.errors[type(exc).__name__] += 1
                continue
            with self._lock:
                self.result.statuses[reply.status] += 1
                self.result.latencies.append(time.monotonic() - start)
                self.result.upstreams[reply.headers.get("x-upstream", "?")] += 1
            if reply.headers.get("connection", "").lower() == "close":
                conn.close()
                conn = http.client.HTTPConnection(netloc, timeout=60)
        conn.close()

    def start(self) -> Load:
        """Start the clients."""
        self._started = time.monotonic()
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> LoadResult:
        """Stop after the requests in flight; the result."""
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=90)
        self.result.seconds = time.monotonic() - self._started
        return self.result


@contextmanager
def under_load(base_url: str, concurrency: int, what: str) -> Iterator[Load]:
    """Keep a load running for the duration of the block; log its summary."""
    load = Load(base_url, concurrency).start()
    try:
        yield load
    finally:
        result = load.stop()
        log(f"load during {what}: {result.summary()}")


def timed_load(base_url: str, concurrency: int, seconds: float) -> LoadResult:
    """A load run of fixed length."""
    load = Load(base_url, concurrency).start()
    time.sleep(seconds)
    return load.stop()


# -- compose smoke test ---------------------------------------------------------------------


def smoke(base_url: str, container: str) -> None:
    """The running compose container: page, /predict, 413, 415, /metrics, non-root, read-only."""
    page = request(f"{base_url}/")
    check(page.status == 200, f"GET / answered {page.status}")
    check(b"<form" in page.body, "GET / has no upload form")

    reply = request(
        f"{base_url}/predict?explain=false", "POST", multipart(PHOTO.name, PHOTO.read_bytes())
    )
    check(reply.status == 200, f"POST /predict answered {reply.status}: {reply.body[:200]!r}")
    result = reply.json()
    probability = result.get("probability_malignant")
    check(result.get("status") == "ok", f"/predict status {result.get('status')}")
    check(isinstance(probability, float) and 0 <= probability <= 1, f"probability {probability}")
    check(result.get("label") == "malignant", f"the melanoma photo came back {result.get('label')}")
    log(f"/predict: {result['label']} p={probability} model {result.get('model_version')}")

    too_big = multipart("big.jpg", b"\xff" * (10 * 1024 * 1024 + 1))
    status = request(f"{base_url}/predict", "POST", too_big).status
    check(status == 413, f"an 11 MB upload answered {status}, not 413")
    status = request(
        f"{base_url}/predict", "POST", multipart("x.jpg", b"not an image", "image/jpeg")
    ).status
    check(status == 415, f"a text file answered {status}, not 415")

    metrics = request(f"{base_url}/metrics")
    check(metrics.status == 200, f"/metrics answered {metrics.status}")
    text = metrics.body.decode()
    check('triage_predictions_total{label="malignant"}' in text, "/metrics lacks the prediction")
    check("triage_model_ready 1.0" in text, "/metrics does not report the model ready")

    uid = docker("exec", container, "id", "-u")
    check(uid != "0", "the server runs as root")
    proc_uid = docker("exec", container, "sh", "-c", "awk '/^Uid:/{print $2}' /proc/1/status")
    check(proc_uid == uid, f"PID 1 runs as uid {proc_uid}, exec as {uid}")
    read_only = docker("inspect", "-f", "{{.HostConfig.ReadonlyRootfs}}", container)
    check(read_only == "true", "the root filesystem is not read-only")
    probe = subprocess.run(
        ["docker", "exec", container, "sh", "-c", "touch /srv/triage/x /x 2>/dev/null"],
        capture_output=True,
        timeout=30,
        check=False,
    )
    check(probe.returncode != 0, "a file could be written outside /tmp")
    docker("exec", container, "sh", "-c", "touch /tmp/ok && rm /tmp/ok")
    changed = docker("diff", container)
    check(not changed, f"files written outside /tmp: {changed.splitlines()[:3]}")
    log(f"smoke: page, /predict, 413, 415, /metrics; uid {uid}, read-only, no writes outside /tmp")


# -- Swarm ----------------------------------------------------------------------------------


def check_threads_match_cpus(service: str) -> None:
    """Each replica's CPU quota (its cgroup, read inside it) equals TensorFlow's thread count."""
    script = (
        "if [ -f /sys/fs/cgroup/cpu.max ]; then read q p < /sys/fs/cgroup/cpu.max; "
        "else q=$(cat /sys/fs/cgroup/cpu/cpu.cfs_quota_us); "
        "p=$(cat /sys/fs/cgroup/cpu/cpu.cfs_period_us); fi; "
        'echo "$q $p $TF_NUM_INTRAOP_THREADS $TF_NUM_INTEROP_THREADS $OMP_NUM_THREADS '
        '$TRIAGE_OPENVINO_STREAMS"'
    )
    for container in service_containers(service):
        quota, period, *threads = docker("exec", container, "sh", "-c", script).split()
        check(quota not in ("max", "-1"), f"replica {container[:12]} has no CPU limit")
        cpus = math.ceil(int(quota) / int(period))
        check(
            len(threads) == 4 and all(int(t) == cpus for t in threads),
            f"replica {container[:12]}: {cpus} CPU(s) but threads {threads}",
        )
    log(f"CPU limit, TensorFlow/OpenMP threads and OpenVINO streams agree ({cpus}) everywhere")


def model_versions(base_url: str, replicas: int) -> Counter[tuple[str, str]]:
    """(replica, model version) pairs seen over a few /model calls through the proxy."""
    seen: Counter[tuple[str, str]] = Counter()
    for _ in range(6 * replicas):
        reply = request(f"{base_url}/model", timeout=10)
        check(reply.status == 200, f"GET /model answered {reply.status}")
        seen[(reply.headers.get("x-upstream", "?"), str(reply.json().get("version")))] += 1
    return seen


def swarm(base_url: str, stack: str, replicas: int, concurrency: int, load_seconds: float) -> None:
    """Replicas healthy, balanced load, rolling update, a killed replica, a model rollout."""
    api = f"{stack}_api"
    took = wait_healthy(api, replicas, timeout=300)
    wait_for("the proxy", lambda: get_ok(f"{base_url}/proxy-health"), timeout=60)
    log(f"{replicas}/{replicas} replicas healthy after {took:.0f} s more")
    check_threads_match_cpus(api)

    ips = {container_ip(c) for c in service_containers(api)}
    result = timed_load(base_url, concurrency, load_seconds)
    log(f"load: {result.summary()}")
    check(result.failed == 0, f"load run: {result.failed} failed requests")
    reached = {addr.rsplit(":", 1)[0] for addr in result.upstreams}
    check(ips <= reached, f"replicas never reached: {sorted(ips - reached)}")

    # Rolling update to a new tag (same content, new task spec), start-first, health-gated.
    image = docker("service", "inspect", "-f", "{{.Spec.TaskTemplate.ContainerSpec.Image}}", api)
    image = image.split("@")[0]
    new_tag = f"{image.rsplit(':', 1)[0]}:rolling-update-test"
    docker("tag", image, new_tag)
    try:
        with under_load(base_url, concurrency, "the rolling update") as load:
            start = time.monotonic()
            update(api, "--image", new_tag)
            took = time.monotonic() - start
        check(load.result.failed == 0, f"rolling update: {load.result.failed} failed requests")
        check(load.result.ok > 0, "no request succeeded during the rolling update")
        log(f"rolling update of {replicas} replicas took {took:.0f} s, 0 failed requests")
        wait_healthy(api, replicas, timeout=120)

        # Kill one replica's container under load: Swarm replaces it.
        with under_load(base_url, concurrency, "the killed replica") as load:
            time.sleep(3)
            victim = service_containers(api)[0]
            docker("kill", victim)
            took = wait_for(
                "a replacement replica",
                lambda: (
                    victim not in service_containers(api, healthy_only=False)
                    and len(service_containers(api)) == replicas
                ),
                timeout=240,
            )
            time.sleep(3)
        failed, retried = load.result.failed, load.result.retried
        log(
            f"killed {victim[:12]}: back to {replicas}/{replicas} in {took:.0f} s, "
            f"{failed} failed requests, {retried} retried on another replica by the proxy"
        )
        check(failed <= concurrency, f"{failed} failed requests after one kill (> {concurrency})")
        check(load.result.ok > 0, "no request succeeded while a replica was replaced")

        model_rollout(base_url, api, replicas, concurrency)
    finally:
        docker("rmi", new_tag, ok=False)


def update(service: str, *args: str) -> None:
    """``docker service update`` that waits for convergence (bounded) and must not roll back."""
    docker("service", "update", "--detach=false", "--no-resolve-image", *args, service, timeout=600)
    template = "{{if .UpdateStatus}}{{.UpdateStatus.State}}{{end}}"

    def finished() -> bool:  # the CLI returns once converged, before the monitor period ends
        state = docker("service", "inspect", "-f", template, service)
        check(state in ("", "updating", "completed"), f"update of {service} ended {state!r}")
        return state != "updating"

    wait_for(f"the update of {service} to complete", finished, timeout=120)


def model_rollout(base_url: str, api: str, replicas: int, concurrency: int) -> None:
    """Mount a second model version read-only and point TRIAGE_MODEL_DIR at it, under load."""
    before = model_versions(base_url, replicas)
    old = {version for _, version in before}
    check(len(old) == 1, f"replicas disagree on the model version: {before}")
    new_version = f"{old.pop()}-rollout-test"
    models = Path(tempfile.mkdtemp(prefix="triage-models-"))
    try:
        shutil.copytree(ROOT / "models" / "default", models / "v2")
        meta_path = models / "v2" / "metadata.json"
        meta = json.loads(meta_path.read_text())
        meta["version"] = new_version
        meta_path.write_text(json.dumps(meta, indent=2))
        subprocess.run(["chmod", "-R", "a+rX", str(models)], check=True, timeout=30)
        mount = f"type=bind,source={models},target=/models,readonly"
        with under_load(base_url, concurrency, "the model rollout") as load:
            update(api, "--mount-add", mount, "--env-add", "TRIAGE_MODEL_DIR=/models/v2")
        check(load.result.failed == 0, f"model rollout: {load.result.failed} failed requests")
        wait_healthy(api, replicas, timeout=120)
        after = model_versions(base_url, replicas)
        versions = {version for _, version in after}
        check(versions == {new_version}, f"after the rollout /model reports {versions}")
        check(len(after) == replicas, f"/model answered from {len(after)} of {replicas} replicas")
        log(f"model rollout: every replica reports {new_version}, 0 failed requests")
        # Going back is the same kind of update (`--mount-rm /models --env-rm
        # TRIAGE_MODEL_DIR`); not run here, the stack is removed next.
    finally:
        shutil.rmtree(models, ignore_errors=True)


# -- figures --------------------------------------------------------------------------------


def memory_mib(container: str) -> float:
    """A container's current memory use in MiB (docker stats)."""
    usage = docker("stats", "--no-stream", "--format", "{{.MemUsage}}", container, timeout=60)
    amount = usage.split("/")[0].strip()
    units = {"KiB": 1 / 1024, "MiB": 1, "GiB": 1024, "B": 1 / 1024 / 1024}
    unit = next(u for u in units if amount.endswith(u))
    return float(amount.removesuffix(unit)) * units[unit]


def bench(base_url: str, stack: str, concurrency: int, seconds: float) -> None:
    """Requests/s through the proxy with 1, 2 and 3 replicas, memory and start-up time."""
    api = f"{stack}_api"
    rows = []
    for replicas in (1, 2, 3):
        start = time.monotonic()
        docker("service", "scale", "--detach", f"{api}={replicas}")
        wait_healthy(api, replicas, timeout=300)
        ready = time.monotonic() - start
        timed_load(base_url, concurrency, 5)  # warm the connections and the replicas
        result = timed_load(base_url, concurrency, seconds)
        check(result.failed == 0, f"bench with {replicas}: {result.failed} failed requests")
        mem = [memory_mib(c) for c in service_containers(api)]
        lat = sorted(result.latencies)
        rows.append(
            {
                "replicas": replicas,
                "concurrency": concurrency,
                "requests": result.ok,
                "req_per_s": round(result.ok / result.seconds, 2),
                "p50_s": round(lat[len(lat) // 2], 3),
                "p95_s": round(lat[int(len(lat) * 0.95)], 3),
                "memory_mib_per_replica": [round(m) for m in mem],
                "scale_to_healthy_s": round(ready, 1),
                # Other jobs on the machine take CPU too: the 1-minute load average at the end.
                "host_load_1m": float(Path("/proc/loadavg").read_text().split()[0]),
            }
        )
        log(f"bench {replicas} replica(s): {result.summary()}, memory {mem}")
    print(json.dumps(rows, indent=2))


def main(argv: list[str] | None = None) -> int:
    """Command line; exit status 1 with ``FAIL: reason`` on a failed check."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["smoke", "swarm", "bench"])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--container", help="smoke: the compose container's name")
    parser.add_argument("--stack", default="triage", help="swarm, bench: the stack's name")
    parser.add_argument("--replicas", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=20, help="length of a load run")
    args = parser.parse_args(argv)
    url = args.url.rstrip("/")
    try:
        if args.what == "smoke":
            check(bool(args.container), "smoke needs --container")
            smoke(url, args.container)
        elif args.what == "swarm":
            swarm(url, args.stack, args.replicas, args.concurrency, args.seconds)
        else:
            bench(url, args.stack, args.concurrency, args.seconds)
    except (CheckFailed, OSError, http.client.HTTPException) as exc:
        print(f"FAIL: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
