"""The server runs on the runtime dependencies alone (what `make run` and Docker install)."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TRAIN_ONLY = ("pandas", "sklearn", "matplotlib", "skimage", "tqdm", "isic_challenge_scoring")


def test_server_loads_and_predicts_without_training_only_packages(artifact_dir: Path) -> None:
    """Block the training extras' imports (as if not installed) and serve one prediction.

    TensorFlow imports pandas and friends opportunistically when they are installed, so
    checking sys.modules would prove nothing; making them unimportable does.
    """
    code = (
        "import sys, importlib.abc\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        f"        if name.split('.')[0] in {TRAIN_ONLY!r}:\n"
        "            raise ModuleNotFoundError(name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import numpy as np\n"
        "from app.main import load_service\n"
        "import model_training.skin, model_training.quality  # the gates the app may build\n"
        "from app.metrics import Metrics\n"
        "from app.settings import Settings\n"
        f"service = load_service(Settings(model_dir={str(artifact_dir)!r}), Metrics())\n"
        "size = (service.model.metadata.input_height, service.model.metadata.input_width)\n"
        "out = service.model.infer(np.full((1, *size, 3), 128.0, np.float32))\n"
        "print(len(out.probabilities))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "1"


def test_training_only_packages_are_not_runtime_dependencies() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    runtime = " ".join(project["dependencies"]).lower()
    for name in ("pandas", "scikit-learn", "matplotlib", "scikit-image"):
        assert name not in runtime, name
