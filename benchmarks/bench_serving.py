"""Serving benchmark: POST /predict under concurrency, per runtime, against main's server.

One run measures, one server at a time on a free loopback port, each serving the same
artifact:

* ``main``: the server of another checkout (default: ``git archive main`` into a temporary
  folder), i.e. today's server, the baseline of every ratio;
* this tree's server on each runtime (``tensorflow``, ``openvino``) with cross-request
  batching; ``openvino`` with one CPU stream (every core on one batch) and batching; and
  ``openvino`` with ``TRIAGE_BATCH_MAX_SIZE=1`` (one model call per request on OpenVINO's
  asynchronous infer requests, the alternative to batching);
* the chosen runtime's raw in-process throughput (``app.runtime``, as many threads as the
  runtime runs batches at once, batch 1 and batch ``max_batch``; the better one counts),
  measured after the servers have stopped.

At each concurrency, ``c`` keep-alive connections send the same real photo back to back for
``--seconds`` (after a warm-up); throughput is answered requests per second, latencies are
per request. Peak RSS (VmHWM) of each server is read at the end. Prints a table and the
target ratios, writes a PNG (throughput and p50/p99 against concurrency per server).

    .venv/bin/python benchmarks/bench_serving.py [--artifact models/default] \\
        [--concurrency 1 4 16] [--seconds 15] [--png docs/perf/serving.png]

The client shares the machine's cores with the server (as in the issue's measurement), so
absolute figures on a shared machine are noisy; the ratios measured in one run are what
count. Only 127.0.0.1 is contacted; servers are stopped at the end or on any error.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
DEFAULT_IMAGE = REPO / "tests" / "fixtures" / "images" / "isic2017_melanoma_ISIC_0000002.jpg"
BOUNDARY = "benchboundary7MA4YWxkTrZu0gW"


@dataclass
class Point:
    """One server at one concurrency."""

    concurrency: int
    latencies_ms: list[float] = field(default_factory=list)
    seconds: float = 0.0
    errors: int = 0

    @property
    def throughput(self) -> float:
        return len(self.latencies_ms) / self.seconds if self.seconds else 0.0

    def pct(self, q: float) -> float:
        return float(np.percentile(self.latencies_ms, q)) if self.latencies_ms else float("nan")


@dataclass
class ServerRun:
    """A server configuration and its measurements."""

    name: str
    cwd: Path
    env: dict[str, str]
    points: list[Point] = field(default_factory=list)
    ready_s: float = 0.0
    peak_rss_mib: float = 0.0
    loaded_rss_mib: float = 0.0  # RSS right after the top-concurrency point


def free_port() -> int:
    """A loopback port that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def rss_mib(pid: int, key: str = "VmHWM") -> float:
    """VmHWM (peak resident set) or VmRSS (now) of a process, MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


def request_bytes(image: bytes, name: str) -> bytes:
    """One keep-alive POST /predict with the photo as multipart field ``file``."""
    body = (
        (
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n'
            f"Content-Type: image/jpeg\r\n\r\n"
        ).encode()
        + image
        + f"\r\n--{BOUNDARY}--\r\n".encode()
    )
    head = (
        f"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: keep-alive\r\n"
        f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    return head + body


async def _client(
    port: int, payload: bytes, stop_at: float, point: Point, warm_until: float
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        while time.perf_counter() < stop_at:
            t0 = time.perf_counter()
            writer.write(payload)
            await writer.drain()
            status = int((await reader.readline()).split()[1])
            length = 0
            while (line := await reader.readline()) not in (b"\r\n", b""):
                key, _, value = line.decode("latin-1").partition(":")
                if key.lower() == "content-length":
                    length = int(value)
            body = await reader.readexactly(length)
            elapsed = (time.perf_counter() - t0) * 1000.0
            if status != 200 or json.loads(body).get("status") != "ok":
                point.errors += 1
            elif t0 >= warm_until:
                point.latencies_ms.append(elapsed)
    finally:
        writer.close()


async def load(port: int, payload: bytes, concurrency: int, seconds: float, warm: float) -> Point:
    """``concurrency`` connections sending ``payload`` back to back for ``seconds``."""
    point = Point(concurrency)
    start = time.perf_counter()
    warm_until, stop_at = start + warm, start + warm + seconds
    await asyncio.gather(
        *(_client(port, payload, stop_at, point, warm_until) for _ in range(concurrency))
    )
    point.seconds = time.perf_counter() - warm_until
    return point


def wait_ready(proc: subprocess.Popen[bytes], port: int, timeout_s: float) -> float:
    """Seconds until /health/ready answers 200."""
    import httpx

    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} during start-up")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health/ready", timeout=2).status_code == 200:
                return time.monotonic() - started
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"server not ready within {timeout_s:.0f} s")


def measure_server(run: ServerRun, args: argparse.Namespace, payload: bytes) -> None:
    """Start ``python -m app`` for ``run``, sweep the concurrencies, stop it."""
    import httpx

    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("TRIAGE_")}
    env.update(
        TRIAGE_MODEL_DIR=str(args.artifact),
        HOST="127.0.0.1",
        PORT=str(port),
        TRIAGE_LOG_LEVEL="warning",
        TF_CPP_MIN_LOG_LEVEL="2",
        PYTHONPATH=str(run.cwd),
    )
    env.update(run.env)
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "app"], cwd=run.cwd, env=env, stdout=log, stderr=log
        )
        try:
            run.ready_s = wait_ready(proc, port, args.ready_timeout)
            httpx.get(f"http://127.0.0.1:{port}/health/ready", timeout=10).raise_for_status()
            for c in args.concurrency:
                point = asyncio.run(load(port, payload, c, args.seconds, args.warmup))
                run.points.append(point)
                print(
                    f"  {run.name:<22} c={c:<3} {point.throughput:7.1f} req/s  "
                    f"p50 {point.pct(50):7.1f} ms  p99 {point.pct(99):7.1f} ms  "
                    f"errors {point.errors}",
                    flush=True,
                )
            run.loaded_rss_mib = rss_mib(proc.pid, "VmRSS")
            run.peak_rss_mib = rss_mib(proc.pid, "VmHWM")
        except Exception:
            log.seek(0)
            print(log.read().decode("utf-8", "replace")[-3000:], file=sys.stderr)
            raise
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)


def raw_throughput(
    artifact: Path, runtime: str, image: Path, seconds: float, batch: int
) -> dict[str, Any]:
    """In this process: the runtime's best images/s (batch 1 and ``batch``, all its streams)."""
    sys.path.insert(0, str(REPO))
    from app.runtime import select_runtime
    from model_training.preprocessing import load_image_file, resize_to_input

    meta = json.loads((artifact / "metadata.json").read_text())
    rt = select_runtime(meta, artifact, runtime)
    pixels = resize_to_input(
        load_image_file(image), (meta["input"]["height"], meta["input"]["width"])
    )
    out: dict[str, Any] = {"runtime": rt.name, "precision": rt.precision, "parallel": rt.parallel}
    for size in (1, batch):
        x = np.repeat(pixels[np.newaxis], size, axis=0)
        for _ in range(2):
            rt.serve(x)
        counts = [0] * rt.parallel
        stop_at = time.perf_counter() + seconds

        def work(
            i: int, x: np.ndarray = x, stop_at: float = stop_at, counts: list[int] = counts
        ) -> None:
            while time.perf_counter() < stop_at:
                rt.serve(x)
                counts[i] += len(x)

        started = time.perf_counter()
        threads = [threading.Thread(target=work, args=(i,)) for i in range(rt.parallel)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        out[f"batch{size}"] = sum(counts) / (time.perf_counter() - started)
    return out


def measure_raw(args: argparse.Namespace, runtime: str) -> dict[str, Any]:
    """``raw_throughput`` in a fresh subprocess (one model process at a time)."""
    cmd = [
        sys.executable, str(Path(__file__).resolve()), "--raw-only", runtime,
        "--artifact", str(args.artifact), "--seconds", str(args.seconds),
        "--image", str(args.image), "--raw-batch", str(args.raw_batch),
    ]  # fmt: skip
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, check=True)
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def baseline_tree(ref: str, dest: Path, with_model: bool = False) -> Path:
    """``git archive ref`` unpacked into ``dest`` (read-only use of the repository); with
    ``with_model``, the ref's own ``models/default`` too."""
    paths = ["app", "model_training", "templates", "static"]
    archive = subprocess.run(
        ["git", "archive", ref, *paths, *(["models/default"] if with_model else [])],
        cwd=REPO, capture_output=True, check=True,
    ).stdout  # fmt: skip
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest


def plot(runs: list[ServerRun], path: Path) -> None:
    """Throughput and p50/p99 against concurrency, one line per server."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_l) = plt.subplots(1, 2, figsize=(11, 4.2))
    for run in runs:
        cs = [p.concurrency for p in run.points]
        line = ax_t.plot(cs, [p.throughput for p in run.points], marker="o", label=run.name)[0]
        colour = line.get_color()
        ax_l.plot(
            cs, [p.pct(50) for p in run.points], marker="o", color=colour, label=f"{run.name} p50"
        )
        ax_l.plot(
            cs,
            [p.pct(99) for p in run.points],
            marker="x",
            ls="--",
            color=colour,
            label=f"{run.name} p99",
        )
    for ax in (ax_t, ax_l):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent clients")
        ax.grid(alpha=0.3)
    ax_t.set_ylabel("POST /predict per second")
    ax_t.set_title("throughput")
    ax_l.set_yscale("log")
    ax_l.set_ylabel("latency (ms)")
    ax_l.set_title("p50 (solid) and p99 (dashed)")
    ax_t.legend(fontsize=8)
    ax_l.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def report(runs: list[ServerRun], raw: dict[str, Any], fast: str) -> None:
    """The table and the target ratios."""
    print()
    print(
        f"{'server':<24}{'c':>4}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}"
        f"{'RSS after MiB':>15}{'peak RSS MiB':>14}"
    )
    for run in runs:
        for p in run.points:
            print(
                f"{run.name:<24}{p.concurrency:>4}{p.throughput:>9.1f}{p.pct(50):>9.1f}"
                f"{p.pct(99):>9.1f}{run.loaded_rss_mib:>15.0f}{run.peak_rss_mib:>14.0f}"
            )
    best_raw = max(v for k, v in raw.items() if k.startswith("batch"))
    print(
        f"raw in-process {raw['runtime']} ({raw['precision']}, {raw['parallel']} parallel): "
        + ", ".join(f"{k} {v:.1f} img/s" for k, v in raw.items() if k.startswith("batch"))
    )
    base = runs[0]
    chosen = next(r for r in runs if r.name == fast)

    def at(run: ServerRun, c: int) -> Point:
        return next(p for p in run.points if p.concurrency == c)

    hi, lo = max(p.concurrency for p in base.points), min(p.concurrency for p in base.points)
    rows = [
        (
            f"throughput c={hi} vs main",
            at(chosen, hi).throughput / at(base, hi).throughput,
            ">= 5x",
        ),
        (f"throughput c={hi} / raw in-process", at(chosen, hi).throughput / best_raw, ">= 0.80"),
        (f"p50 c={lo} vs main", at(chosen, lo).pct(50) / at(base, lo).pct(50), "<= 0.35x"),
        (f"p99 c={hi} vs main", at(chosen, hi).pct(99) / at(base, hi).pct(99), "<= 0.25x"),
        ("RSS after load vs main", chosen.loaded_rss_mib / base.loaded_rss_mib, "<= 1x"),
        ("peak RSS vs main", chosen.peak_rss_mib / base.peak_rss_mib, "<= 1x"),
    ]
    print(f"\nratios of '{fast}' (same run)")
    for name, value, target in rows:
        print(f"  {name:<36}{value:>8.2f}   target {target}")
    print("ready after start: " + ", ".join(f"{r.name} {r.ready_s:.1f} s" for r in runs))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--artifact", type=Path, default=REPO / "models" / "default")
    parser.add_argument("--image", type=Path, default=DEFAULT_IMAGE)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--seconds", type=float, default=15.0, help="timed seconds per point")
    parser.add_argument("--warmup", type=float, default=3.0, help="untimed seconds per point")
    parser.add_argument("--baseline-ref", default="main", help="git ref of today's server")
    parser.add_argument("--baseline-dir", type=Path, default=None, help="or a checkout of it")
    parser.add_argument(
        "--baseline-artifact",
        choices=["same", "own"],
        default="same",
        help="serve the baseline --artifact (same) or its own commit's models/default (own)",
    )
    parser.add_argument("--runtimes", nargs="+", default=["tensorflow", "openvino"])
    parser.add_argument("--raw-batch", type=int, default=8)
    parser.add_argument("--ready-timeout", type=float, default=300.0)
    parser.add_argument("--png", type=Path, default=REPO / "docs" / "perf" / "serving.png")
    parser.add_argument("--raw-only", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run every server, the raw baseline, print and plot."""
    args = parse_args(argv)
    args.artifact = args.artifact.resolve()
    if args.raw_only:
        print(
            json.dumps(
                raw_throughput(
                    args.artifact, args.raw_only, args.image, args.seconds, args.raw_batch
                )
            )
        )
        return 0
    payload = request_bytes(args.image.read_bytes(), args.image.name)
    with tempfile.TemporaryDirectory() as tmp:
        own = args.baseline_artifact == "own"
        base_dir = args.baseline_dir or baseline_tree(args.baseline_ref, Path(tmp), own)
        # An older server may not read today's artifact (newer metadata keys and gate
        # files): "own" serves it the artifact of its own commit (the same network weights).
        own_model = str(base_dir.resolve() / "models" / "default")
        base_env = {"TRIAGE_MODEL_DIR": own_model} if own else {}
        runs = [ServerRun(f"main ({args.baseline_ref})", base_dir.resolve(), base_env)]
        for rt in args.runtimes:
            runs.append(ServerRun(f"perf {rt}", REPO, {"TRIAGE_RUNTIME": rt}))
        if "openvino" in args.runtimes:
            ov = {"TRIAGE_RUNTIME": "openvino"}
            one_stream = {**ov, "TRIAGE_OPENVINO_STREAMS": "1"}
            runs.append(ServerRun("perf openvino 1-stream", REPO, one_stream))
            runs.append(
                ServerRun("perf openvino async", REPO, {**ov, "TRIAGE_BATCH_MAX_SIZE": "1"})
            )
        print(f"artifact {args.artifact}; image {args.image.name}; {os.cpu_count()} CPUs; "
              f"{args.seconds:.0f} s per point", flush=True)  # fmt: skip
        for run in runs:
            measure_server(run, args, payload)
    # The configuration compared with main: the fastest of this tree's servers at top load.
    fastest = max(runs[1:], key=lambda r: max(p.throughput for p in r.points))
    fast = fastest.name
    raw = measure_raw(args, "openvino" if "openvino" in fast else "tensorflow")
    report(runs, raw, fast)
    plot(runs, args.png)
    print(f"plot: {args.png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
