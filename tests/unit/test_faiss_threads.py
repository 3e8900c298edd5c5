"""``Settings.faiss_threads`` reaches FAISS whichever comes first, the runtime or FAISS, and
creating a runtime does not load FAISS (the web tier never does)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def run(code: str) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MODERATION_", "OMP_"))}
    env["PYTHONPATH"] = str(REPO)
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_a_runtime_created_first_sets_the_threads_when_faiss_loads(tmp_path: Path) -> None:
    out = run(
        "import sys\n"
        "from moderation.config import load_settings\n"
        "from moderation.service.runtime import Runtime\n"
        f"Runtime(load_settings(data_dir={str(tmp_path)!r}, faiss_threads=3))\n"
        "assert 'faiss' not in sys.modules, 'creating a runtime loaded FAISS'\n"
        "import moderation.banks.index, faiss\n"
        "print(faiss.omp_get_max_threads())\n"
    )
    assert out == "3"


def test_faiss_loaded_first_gets_the_threads_when_the_runtime_is_created(tmp_path: Path) -> None:
    out = run(
        "import moderation.banks.index, faiss\n"
        "from moderation.config import load_settings\n"
        "from moderation.service.runtime import Runtime\n"
        f"Runtime(load_settings(data_dir={str(tmp_path)!r}, faiss_threads=3))\n"
        "print(faiss.omp_get_max_threads())\n"
    )
    assert out == "3"
