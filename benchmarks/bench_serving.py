"""Serving benchmark: HTTP latency of the real server against the raw model, and its memory.

Starts ``python -m app`` (uvicorn) in a subprocess on a free loopback port with
``TRIAGE_MODEL_DIR`` pointing at the artifact, waits for ``/health/ready``, then times N
sequential requests of a real fixture photo to ``POST /predict``, ``/predict?explain=true``
and ``/predict/batch`` (4 copies), and reads the server's RSS from ``/proc/<pid>/status``.
The baseline is measured in the same run, after the server has stopped: the artifact's
``serve`` (and ``explain``) called in-process through ``tf.saved_model.load`` on the same
preprocessed image, so the printed ratios show what HTTP, decoding, gates and JSON add.

    .venv/bin/python benchmarks/bench_serving.py [MODEL_DIR] [-n 30] [--image PATH]

Only 127.0.0.1 is contacted; every phase has a time limit, and the server is stopped at the
end (or on any error). Uploads are not stored (TRIAGE_STORE_UPLOADS_DIR is cleared).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

REPO = Path(__file__).resolve().parent.parent
DEFAULT_IMAGE = REPO / "tests" / "fixtures" / "images" / "isic2017_melanoma_ISIC_0000002.jpg"
MIB = 1024 * 1024
WARMUP_CALLS = 2


@dataclass
class Series:
    """Latencies of one measured operation, in milliseconds."""

    name: str
    latencies_ms: list[float] = field(default_factory=list)
    server_total_ms: list[float] = field(default_factory=list)
    server_model_ms: list[float] = field(default_factory=list)
    statuses: dict[str, int] = field(default_factory=dict)

    def pct(self, q: float, values: list[float] | None = None) -> float:
        """The q-th percentile (linear interpolation), NaN when empty."""
        data = self.latencies_ms if values is None else values
        return float(np.percentile(data, q)) if data else float("nan")


def free_port() -> int:
    """A loopback port that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def proc_memory_mib(pid: int) -> dict[str, float]:
    """VmRSS and VmHWM (peak RSS) of a process, in MiB."""
    values: dict[str, float] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0]) / 1024.0  # kB
    return values


def start_server(model_dir: Path, port: int, log: Any) -> subprocess.Popen[bytes]:
    """``python -m app`` on 127.0.0.1:port serving ``model_dir`` with default settings."""
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("TRIAGE_")}
    env.update(
        TRIAGE_MODEL_DIR=str(model_dir),
        HOST="127.0.0.1",
        PORT=str(port),
        TRIAGE_LOG_LEVEL="warning",
        TF_CPP_MIN_LOG_LEVEL="2",
    )
    return subprocess.Popen(
        [sys.executable, "-m", "app"], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT
    )


def wait_ready(proc: subprocess.Popen[bytes], base_url: str, timeout_s: float) -> float:
    """Seconds from now until /health/ready answers 200; raises if the server dies or hangs."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with status {proc.returncode} during start-up")
        try:
            if httpx.get(f"{base_url}/health/ready", timeout=2.0).status_code == 200:
                return time.monotonic() - started
        except httpx.TransportError:
            pass  # uvicorn listens only once the model is loaded and warmed up
        time.sleep(0.2)
    raise RuntimeError(f"the server was not ready within {timeout_s:.0f} s")


def measure_http(
    client: httpx.Client,
    series: Series,
    request: Callable[[], httpx.Response],
    n: int,
    deadline: float,
) -> None:
    """Warm up, then time ``n`` sequential requests (fewer if the deadline passes)."""
    for _ in range(WARMUP_CALLS):
        request().raise_for_status()
    for _ in range(n):
        if time.monotonic() > deadline:
            print(f"  ! time budget spent: {series.name} stopped after {len(series.latencies_ms)}")
            break
        t0 = time.perf_counter()
        response = request()
        elapsed = (time.perf_counter() - t0) * 1000.0
        response.raise_for_status()
        body = response.json()
        results = body.get("results", [body])
        series.latencies_ms.append(elapsed)
        for result in results:
            status = str(result.get("status"))
            series.statuses[status] = series.statuses.get(status, 0) + 1
        timings = results[0].get("timings_ms") or {}
        series.server_total_ms.append(float(timings.get("total", float("nan"))))
        series.server_model_ms.append(
            float(timings.get("inference", 0.0)) + float(timings.get("explain", 0.0))
        )


def measure_raw(series: Series, call: Callable[[], Any], n: int, deadline: float) -> None:
    """Warm up, then time ``n`` in-process calls; outputs are pulled to numpy like the server."""

    def run() -> None:
        outputs = call()
        for value in outputs.values():
            value.numpy()

    for _ in range(WARMUP_CALLS):
        run()
    for _ in range(n):
        if time.monotonic() > deadline:
            print(f"  ! time budget spent: {series.name} stopped after {len(series.latencies_ms)}")
            break
        t0 = time.perf_counter()
        run()
        series.latencies_ms.append((time.perf_counter() - t0) * 1000.0)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "model_dir",
        nargs="?",
        type=Path,
        default=REPO / "models" / "default",
        help="model artifact folder (default models/default)",
    )
    parser.add_argument("-n", "--requests", type=int, default=30, help="timed calls per case")
    parser.add_argument("--image", type=Path, default=DEFAULT_IMAGE, help="photo to send")
    parser.add_argument("--batch", type=int, default=4, help="files per /predict/batch call")
    parser.add_argument("--ready-timeout", type=float, default=300.0, help="start-up limit (s)")
    parser.add_argument("--budget", type=float, default=1200.0, help="limit for all timing (s)")
    args = parser.parse_args(argv)
    if args.requests < 1 or args.batch < 1:
        parser.error("--requests and --batch must be at least 1")
    return args


def run_server_phase(
    args: argparse.Namespace, image: bytes, deadline: float
) -> tuple[list[Series], dict[str, float]]:
    """Start the server, time the HTTP cases, read its memory, stop it."""
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    facts: dict[str, float] = {}
    name = args.image.name
    with tempfile.TemporaryFile() as log:
        proc = start_server(args.model_dir, port, log)
        try:
            facts["ready_s"] = wait_ready(proc, base_url, args.ready_timeout)
            after_load = proc_memory_mib(proc.pid)
            facts["rss_ready"], facts["hwm_ready"] = after_load["VmRSS"], after_load["VmHWM"]

            single = Series("POST /predict")
            explain = Series("POST /predict?explain=true")
            batch = Series(f"POST /predict/batch ({args.batch} files)")
            with httpx.Client(base_url=base_url, timeout=120.0) as client:
                file_part = ("file", (name, image, "image/jpeg"))
                batch_parts = [("files", (name, image, "image/jpeg"))] * args.batch
                measure_http(
                    client,
                    single,
                    lambda: client.post("/predict", files=[file_part]),
                    args.requests,
                    deadline,
                )
                measure_http(
                    client,
                    explain,
                    lambda: client.post("/predict", params={"explain": "true"}, files=[file_part]),
                    args.requests,
                    deadline,
                )
                measure_http(
                    client,
                    batch,
                    lambda: client.post("/predict/batch", files=batch_parts),
                    args.requests,
                    deadline,
                )
            at_end = proc_memory_mib(proc.pid)
            facts["rss_end"], facts["hwm_end"] = at_end["VmRSS"], at_end["VmHWM"]
        except Exception:
            log.seek(0)
            tail = log.read().decode("utf-8", "replace")[-4000:]
            print(f"server log (tail):\n{tail}", file=sys.stderr)
            raise
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
    return [single, explain, batch], facts


def run_raw_phase(
    args: argparse.Namespace, image: bytes, meta: dict[str, Any], deadline: float
) -> list[Series]:
    """The baseline: the SavedModel's endpoints in this process on the same input."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.path.insert(0, str(REPO))
    import tensorflow as tf

    from model_training.preprocessing import decode_image, resize_to_input

    size = (int(meta["input"]["height"]), int(meta["input"]["width"]))
    pixels = resize_to_input(decode_image(image), size)  # exactly the server's preprocessing
    one = tf.constant(pixels[np.newaxis], dtype=tf.float32)
    many = tf.constant(np.repeat(pixels[np.newaxis], args.batch, axis=0), dtype=tf.float32)
    saved = tf.saved_model.load(str(args.model_dir / "saved_model"))

    serve1 = Series("raw serve (batch 1)")
    explain1 = Series("raw explain (batch 1)")
    serve_b = Series(f"raw serve (batch {args.batch})")
    measure_raw(serve1, lambda: saved.serve(one), args.requests, deadline)
    measure_raw(explain1, lambda: saved.explain(one), args.requests, deadline)
    measure_raw(serve_b, lambda: saved.serve(many), args.requests, deadline)
    return [serve1, explain1, serve_b]


def report(
    args: argparse.Namespace,
    meta: dict[str, Any],
    image: bytes,
    http: list[Series],
    raw: list[Series],
    facts: dict[str, float],
) -> None:
    """Print the figures."""
    serve1, explain1, serve_batch = (s.pct(50) for s in raw)
    # The raw model work each HTTP case does: /predict?explain=true runs serve, then explain.
    raw_work = (serve1, serve1 + explain1, serve_batch)
    same_op = dict(zip((s.name for s in http), raw_work, strict=True))
    print(
        f"model    {meta.get('name')} {meta.get('version')} ({meta.get('architecture')}, "
        f"input {meta['input']['height']}x{meta['input']['width']}) from {args.model_dir}"
    )
    print(f"image    {args.image.name} ({len(image)} bytes), n={args.requests} timed calls/case")
    print(f"machine  {os.cpu_count()} CPUs visible, python {sys.version.split()[0]}")
    print(f"server   ready {facts['ready_s']:.1f} s after start (import, load, warm-up)")
    print(
        f"server   RSS after load {facts['rss_ready']:.0f} MiB (peak so far "
        f"{facts['hwm_ready']:.0f} MiB); after the run RSS {facts['rss_end']:.0f} MiB, "
        f"peak RSS (VmHWM) {facts['hwm_end']:.0f} MiB"
    )
    print()
    header = (
        f"{'case':<34}{'n':>4}{'p50 ms':>10}{'p95 ms':>10}{'srv total':>11}{'srv model':>11}"
        f"{'/raw b1':>9}{'/raw same':>11}"
    )
    print(header)
    print("-" * len(header))
    for s in http:
        same = same_op[s.name]
        print(
            f"{s.name:<34}{len(s.latencies_ms):>4}{s.pct(50):>10.1f}{s.pct(95):>10.1f}"
            f"{s.pct(50, s.server_total_ms):>11.1f}{s.pct(50, s.server_model_ms):>11.1f}"
            f"{s.pct(50) / serve1:>8.2f}x{s.pct(50) / same:>10.2f}x"
        )
    for s in raw:
        print(
            f"{s.name:<34}{len(s.latencies_ms):>4}{s.pct(50):>10.1f}{s.pct(95):>10.1f}"
            f"{'':>11}{'':>11}{s.pct(50) / serve1:>8.2f}x"
        )
    print()
    print("srv total/model: p50 of the server's own timings_ms (whole request; inference+explain).")
    print("/raw b1: HTTP p50 / raw serve batch-1 p50; /raw same: HTTP p50 / raw p50 of the same")
    print(f"model work (serve+explain b1 for explain=true, serve b{args.batch} for the batch).")
    outcomes = {s.name: s.statuses for s in http}
    print(f"result statuses: {json.dumps(outcomes)}")


def main(argv: list[str] | None = None) -> int:
    """Run both phases and print the report."""
    args = parse_args(argv)
    args.model_dir = args.model_dir.resolve()
    meta_path = args.model_dir / "metadata.json"
    if not meta_path.is_file():
        print(f"no artifact at {args.model_dir} (metadata.json missing)", file=sys.stderr)
        return 2
    meta = json.loads(meta_path.read_text())
    image = args.image.read_bytes()
    deadline = time.monotonic() + args.budget

    http, facts = run_server_phase(args, image, deadline)
    raw = run_raw_phase(args, image, meta, deadline)
    report(args, meta, image, http, raw, facts)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
