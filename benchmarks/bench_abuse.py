"""Abuse and soak benchmark for issue #11: memory under decompression bombs, slow clients,
bad inputs and a SIGTERM drain, against the real server (``python -m app``) on loopback.

    .venv/bin/python benchmarks/bench_abuse.py [MODEL_DIR] [--soak-requests 2000]
        [--concurrency 16] [--slow-clients 50] [--phases abuse,soak,sigterm]

Phases (each bounded in count and time; the server is restarted for the SIGTERM phase):
  abuse    16 concurrent /predict of a 692-byte JPEG claiming 7000x7000, then 16 concurrent
           /predict/batch of 4 of them, then 16 of a 7000x7000 PNG: statuses, slowest answer,
           peak RSS, and RSS 10 s later.
  soak     ``--soak-requests`` requests at ``--concurrency`` (10% bad inputs), once alone and
           once beside ``--slow-clients`` uploads trickling at 1 KB/s (each reconnects after
           it is cut off): 5xx count, p50/p99 of the good requests, RSS growth, cut-offs.
  sigterm  8 photos in flight and 10 slow uploads, then SIGTERM: time until readiness 503,
           statuses of the 8, time until the process exits vs pre-stop + drain.

Only 127.0.0.1 is contacted. Figures are absolute for this machine: on a shared 2-core host
other processes (and this client, which runs on the same cores) move them.
"""

from __future__ import annotations

import argparse
import io
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
PHOTO = REPO / "tests" / "fixtures" / "images" / "isic2017_melanoma_ISIC_0000002.jpg"
GB = 1e9
PEAK_TARGET_GB, SETTLED_TARGET_GB, SETTLE_S = 1.5, 1.1, 10.0


# -- inputs ----------------------------------------------------------------------------------
def claimed_jpeg(side: int = 7000) -> bytes:
    """A valid JPEG of a few hundred bytes whose header claims side x side pixels."""
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (180, 120, 100)).save(buf, "JPEG", quality=95)
    data = bytearray(buf.getvalue())
    sof = data.find(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", side, side)
    return bytes(data)


def big_png(side: int = 7000) -> bytes:
    buf = io.BytesIO()
    Image.new("L", (side, side), 128).save(buf, "PNG", optimize=True)
    return buf.getvalue()


def bad_inputs(photo: bytes) -> list[tuple[str, bytes, str]]:
    """Requests a hostile or careless client sends: (name, bytes, content type)."""
    return [
        ("notes.txt", b"not an image at all", "text/plain"),
        ("cut.jpg", photo[: len(photo) // 2], "image/jpeg"),
        ("bomb.jpg", claimed_jpeg(), "image/jpeg"),
        ("empty.jpg", b"", "image/jpeg"),
        ("strip.png", _png_strip(), "image/png"),
    ]


def _png_strip() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (4000, 80), (180, 120, 100)).save(buf, "PNG")
    return buf.getvalue()


# -- the server --------------------------------------------------------------------------------
@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    base: str
    rss: list[tuple[float, float]] = field(default_factory=list)  # (monotonic, bytes)
    _stop: threading.Event = field(default_factory=threading.Event)

    def rss_now(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024.0
        return 0.0

    def sample(self) -> None:
        while not self._stop.is_set() and self.proc.poll() is None:
            try:
                self.rss.append((time.monotonic(), self.rss_now()))
            except OSError:
                break
            time.sleep(0.05)

    def peak_since(self, t0: float) -> float:
        return max((r for t, r in self.rss if t >= t0), default=0.0)

    def stop(self) -> None:
        self._stop.set()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            self.proc.send_signal(signal.SIGINT)  # second SIGINT: no drain needed here
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def start_server(model_dir: Path, extra_env: dict[str, str]) -> Server:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("TRIAGE_")}
    env.update(TRIAGE_MODEL_DIR=str(model_dir), HOST="127.0.0.1", PORT=str(port), **extra_env)
    env.setdefault("TRIAGE_LOG_LEVEL", "warning")
    proc = subprocess.Popen(
        [sys.executable, "-m", "app"], cwd=REPO, env=env, stderr=subprocess.DEVNULL
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} during start-up")
        try:
            if httpx.get(f"{base}/health/ready", timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("server not ready within 180 s")
        time.sleep(0.2)
    server = Server(proc, base)
    threading.Thread(target=server.sample, daemon=True).start()
    return server


# -- clients -----------------------------------------------------------------------------------
def post(
    base: str, path: str, files: list[tuple[str, tuple[str, bytes, str]]]
) -> tuple[int, float]:
    """(status, seconds); status 0 for a transport error."""
    t0 = time.perf_counter()
    try:
        r = httpx.post(f"{base}{path}", files=files, timeout=120)
        return r.status_code, time.perf_counter() - t0
    except httpx.HTTPError:
        return 0, time.perf_counter() - t0


def burst(n: int, call: Callable[[], tuple[int, float]]) -> tuple[dict[int, int], float]:
    with ThreadPoolExecutor(n) as pool:
        results = list(pool.map(lambda _: call(), range(n)))
    statuses: dict[int, int] = {}
    for status, _ in results:
        statuses[status] = statuses.get(status, 0) + 1
    return statuses, max(t for _, t in results)


class SlowClient(threading.Thread):
    """Uploads a photo at ~1 KB/s; reconnects each time the server cuts it off."""

    def __init__(self, base: str, stop: threading.Event, rate: int = 1024) -> None:
        super().__init__(daemon=True)
        host, port = base.removeprefix("http://").split(":")
        self.address = (host, int(port))
        self.stop_event, self.rate = stop, rate
        self.cut_after: list[float] = []  # seconds each connection lasted before the cut
        self.answers: dict[str, int] = {}

    def run(self) -> None:
        while not self.stop_event.is_set():
            self.one()

    def one(self) -> None:
        head = (
            b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: 300000\r\n"
            b"Content-Type: multipart/form-data; boundary=b0undary\r\n\r\n--b0undary\r\n"
            b'Content-Disposition: form-data; name="file"; filename="slow.jpg"\r\n'
            b"Content-Type: image/jpeg\r\n\r\n"
        )  # a well-formed upload whose photo bytes then trickle in
        t0 = time.monotonic()
        try:
            with socket.create_connection(self.address, timeout=120) as sock:
                sock.sendall(head)
                sock.setblocking(False)
                answer = b""
                while not self.stop_event.is_set():
                    try:
                        answer = sock.recv(256)
                        break  # the server answered (or closed: b"")
                    except BlockingIOError:
                        pass
                    sock.sendall(b"x" * self.rate)
                    time.sleep(1.0)
                if self.stop_event.is_set() and not answer:
                    return
        except OSError:
            answer = b"reset"
        self.cut_after.append(time.monotonic() - t0)
        key = answer[9:12].decode("latin-1", "replace") if answer.startswith(b"HTTP/") else "closed"
        self.answers[key] = self.answers.get(key, 0) + 1


@dataclass
class Soak:
    statuses: dict[int, int]
    good_latencies: list[float]
    rss_start: float
    rss_end: float

    def pct(self, q: float) -> float:
        return float(np.percentile(self.good_latencies, q)) * 1000 if self.good_latencies else 0


def soak(server: Server, n: int, concurrency: int, photo: bytes) -> Soak:
    bad = bad_inputs(photo)
    plan = [bad[i // 10 % len(bad)] if i % 10 == 9 else None for i in range(n)]
    good: list[float] = []
    statuses: dict[int, int] = {}
    lock = threading.Lock()

    def one(item: tuple[str, bytes, str] | None) -> None:
        files = [("file", item if item else ("m.jpg", photo, "image/jpeg"))]
        status, seconds = post(server.base, "/predict", files)
        with lock:
            statuses[status] = statuses.get(status, 0) + 1
            if item is None and status == 200:
                good.append(seconds)

    time.sleep(1.0)
    rss_start = server.rss_now()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, plan))
    time.sleep(2.0)
    return Soak(statuses, good, rss_start, server.rss_now())


# -- phases ------------------------------------------------------------------------------------
Row = tuple[str, str, str, str]


def phase_abuse(model_dir: Path, env: dict[str, str]) -> list[Row]:
    server = start_server(model_dir, env)
    rows: list[Row] = []
    try:
        bomb, png = claimed_jpeg(), big_png()
        idle = server.rss_now()
        rows.append(("idle RSS after start-up", f"{idle / GB:.2f} GB", "", ""))
        cases = [
            (
                f"16 x /predict, {len(bomb)}-byte JPEG claiming 7000x7000",
                "/predict",
                [("file", ("bomb.jpg", bomb, "image/jpeg"))],
            ),
            (
                "16 x /predict/batch of 4 such JPEGs",
                "/predict/batch",
                [("files", (f"b{i}.jpg", bomb, "image/jpeg")) for i in range(4)],
            ),
            (
                f"16 x /predict, {len(png) // 1024} KB PNG 7000x7000",
                "/predict",
                [("file", ("bomb.png", png, "image/png"))],
            ),
        ]
        for name, path, files in cases:
            t0 = time.monotonic()
            statuses, slowest = burst(16, lambda p=path, f=files: post(server.base, p, f))
            done = time.monotonic()
            time.sleep(SETTLE_S)
            peak = server.peak_since(t0)
            settled = [t - done for t, r in server.rss if t >= done and r < SETTLED_TARGET_GB * GB]
            after = server.rss_now()
            ok = (
                peak <= PEAK_TARGET_GB * GB and after < SETTLED_TARGET_GB * GB and 0 not in statuses
            )
            rows.append(
                (
                    name,
                    f"statuses {statuses}, slowest {slowest:.1f} s",
                    f"peak {peak / GB:.2f} GB, {SETTLE_S:.0f} s later {after / GB:.2f} GB"
                    + (f" (< {SETTLED_TARGET_GB} GB after {settled[0]:.1f} s)" if settled else ""),
                    "OK" if ok else "MISS",
                )
            )
    finally:
        server.stop()
    return rows


def phase_soak(
    model_dir: Path, env: dict[str, str], n: int, concurrency: int, slow_clients: int
) -> list[Row]:
    photo = PHOTO.read_bytes()
    server = start_server(model_dir, env)
    try:
        for _ in range(4):  # warm-up
            post(server.base, "/predict", [("file", ("m.jpg", photo, "image/jpeg"))])
        alone = soak(server, n, concurrency, photo)
        stop = threading.Event()
        slow = [SlowClient(server.base, stop) for _ in range(slow_clients)]
        for client in slow:
            client.start()
        time.sleep(2.0)
        beside = soak(server, n, concurrency, photo)
        stop.set()
        for client in slow:
            client.join(timeout=5)
    finally:
        server.stop()
    cuts = [c for client in slow for c in client.cut_after]
    answers: dict[str, int] = {}
    for client in slow:
        for key, count in client.answers.items():
            answers[key] = answers.get(key, 0) + count
    rows: list[Row] = []
    for name, run in (("soak alone", alone), (f"soak + {slow_clients} slow clients", beside)):
        errors = sum(c for s, c in run.statuses.items() if s >= 500 or s == 0)
        growth = run.rss_end / run.rss_start - 1
        rows.append(
            (
                f"{name}: {n} req at {concurrency}, 10% bad",
                f"statuses {dict(sorted(run.statuses.items()))}",
                f"p50 {run.pct(50):.0f} ms, p99 {run.pct(99):.0f} ms; RSS "
                f"{run.rss_start / GB:.2f} -> {run.rss_end / GB:.2f} GB ({growth:+.1%})",
                "OK" if errors == 0 and growth <= 0.10 else "MISS",
            )
        )
    ratio = beside.pct(99) / alone.pct(99) if alone.pct(99) else float("nan")
    rows.append(
        (
            "slow clients (1 KB/s) cut off",
            f"{len(cuts)} cut-offs, answers {answers}",
            f"median {np.median(cuts) if cuts else float('nan'):.1f} s, max "
            f"{max(cuts, default=float('nan')):.1f} s; p99 ratio {ratio:.2f}",
            "OK" if cuts and ratio <= 1.2 else "MISS",
        )
    )
    return rows


def phase_sigterm(model_dir: Path, env: dict[str, str]) -> list[Row]:
    pre_stop, drain = (
        float(env["TRIAGE_SHUTDOWN_PRE_STOP_S"]),
        float(env["TRIAGE_SHUTDOWN_DRAIN_S"]),
    )
    photo = PHOTO.read_bytes()
    server = start_server(model_dir, env)
    stop = threading.Event()
    slow = [SlowClient(server.base, stop) for _ in range(10)]
    for client in slow:
        client.start()
    results: list[tuple[int, float]] = []
    files = [("file", ("m.jpg", photo, "image/jpeg"))]
    workers = [
        threading.Thread(target=lambda: results.append(post(server.base, "/predict", files)))
        for _ in range(8)
    ]
    for w in workers:
        w.start()
    time.sleep(0.5)  # all 8 sent and queued or running
    t0 = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    ready_503 = float("nan")
    while time.monotonic() - t0 < 10:
        try:
            if httpx.get(f"{server.base}/health/ready", timeout=1).status_code == 503:
                ready_503 = time.monotonic() - t0
                break
        except httpx.HTTPError:
            break
        time.sleep(0.02)
    for w in workers:
        w.join(timeout=120)
    try:
        server.proc.wait(timeout=pre_stop + drain + 30)
    except subprocess.TimeoutExpired:
        server.proc.kill()
    exited = time.monotonic() - t0
    stop.set()
    server.stop()
    statuses = [s for s, _ in results]
    grace = pre_stop + drain
    ok = ready_503 <= 1.0 and statuses.count(200) == 8 and exited <= grace
    return [
        (
            "SIGTERM, 8 in flight + 10 slow uploads",
            f"ready 503 after {ready_503:.2f} s; the 8: {sorted(statuses)}",
            f"exit after {exited:.1f} s (pre-stop {pre_stop:g} + drain {drain:g} = {grace:g} s)",
            "OK" if ok else "MISS",
        )
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dir", nargs="?", type=Path, default=REPO / "models" / "default")
    parser.add_argument("--soak-requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--slow-clients", type=int, default=50)
    parser.add_argument("--phases", default="abuse,soak,sigterm")
    parser.add_argument("--arena-max", default="2", help="TRIAGE_MALLOC_ARENA_MAX (0: glibc's)")
    args = parser.parse_args()
    env = {
        "TRIAGE_MALLOC_ARENA_MAX": args.arena_max,
        "TRIAGE_SHUTDOWN_PRE_STOP_S": "2",
        "TRIAGE_SHUTDOWN_DRAIN_S": "25",
    }
    rows: list[Row] = []
    phases = args.phases.split(",")
    if "abuse" in phases:
        rows += phase_abuse(args.model_dir, env)
    if "soak" in phases:
        rows += phase_soak(
            args.model_dir, env, args.soak_requests, args.concurrency, args.slow_clients
        )
    if "sigterm" in phases:
        rows += phase_sigterm(args.model_dir, env)
    print(f"\nmodel {args.model_dir}, MALLOC_ARENA_MAX {args.arena_max}, {os.cpu_count()} CPUs")
    print("| case | answers | figures | target |\n| --- | --- | --- | --- |")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
