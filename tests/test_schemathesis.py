"""Schemathesis with ``--checks all`` over every operation of the real server: 0 failures.

Bounded for CI (2 cores): a few dozen examples per operation and a time budget. Settings
and the reasons for them: tests/schemathesis.toml.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

CONFIG = Path(__file__).parent / "schemathesis.toml"
MAX_EXAMPLES = os.environ.get("SCHEMATHESIS_MAX_EXAMPLES", "25")
MAX_TIME_S = os.environ.get("SCHEMATHESIS_MAX_TIME", "150")

pytestmark = pytest.mark.slow


def test_schemathesis_checks_all_find_nothing(server: Any, tmp_path: Path) -> None:
    exe = shutil.which("schemathesis", path=str(Path(sys.executable).parent))
    if exe is None:
        pytest.skip("schemathesis is not installed (dev dependency group)")
    cmd = [
        exe,
        "--config-file",
        str(CONFIG),
        "run",
        f"{server.base_url}/openapi.json",
        "--checks",
        "all",
        "--max-examples",
        MAX_EXAMPLES,
        "--max-time",
        MAX_TIME_S,
        "--workers",
        "2",
        "--no-color",
    ]
    # Its example database and crash cache go to tmp_path, not the repository.
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-6000:]
    selected = re.search(r"Selected: (\d+)/(\d+)", proc.stdout)
    assert selected and selected[1] == selected[2], proc.stdout[-3000:]  # every operation
