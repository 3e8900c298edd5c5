"""Start-up shortcuts of issue 20: the schema check without Alembic, and the one-photo
``moderation screen`` as a whole process (peak memory, and no torch or Alembic imported)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from moderation.storage import db
from tests.conftest import skimage_photo_path

REPO = Path(__file__).resolve().parents[2]


def test_script_heads_read_as_text_equal_alembics() -> None:
    from alembic.script import ScriptDirectory

    engine = create_engine("sqlite://")
    script = ScriptDirectory.from_config(db._alembic_config(engine))
    assert db.script_heads() == frozenset(script.get_heads())


def test_schema_check_follows_the_database(tmp_path: Path) -> None:
    engine = db.create_db_engine(f"sqlite:///{tmp_path / 'm.db'}")
    assert not db.schema_is_current(engine)  # no alembic_version table
    db.migrate(engine)
    assert db.schema_is_current(engine)
    with engine.begin() as conn:
        # One head's migration missing (the tree has several heads, one row each).
        conn.execute(
            text(
                "DELETE FROM alembic_version WHERE version_num = "
                "(SELECT max(version_num) FROM alembic_version)"
            )
        )
    assert not db.schema_is_current(engine)


def test_unreadable_revision_lines_fall_back_to_alembic(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    versions = tmp_path / "versions"
    versions.mkdir()
    (versions / "0001_x.py").write_text('revision = "0001"\ndown_revision = None\n')
    (versions / "0002_y.py").write_text('revision = compute()\ndown_revision = "0001"\n')
    monkeypatch.setattr(db, "MIGRATIONS_DIR", tmp_path)
    db.script_heads.cache_clear()
    try:
        assert db.script_heads() is None
        (versions / "0002_y.py").write_text('revision = "0002"\ndown_revision = ("0001",)\n')
        db.script_heads.cache_clear()
        assert db.script_heads() == frozenset({"0002"})
    finally:
        db.script_heads.cache_clear()


_PEAK = """
import atexit, json, runpy, sys
def report():
    status = dict(l.split(':', 1) for l in open('/proc/self/status') if ':' in l)
    heavy = sorted(m for m in ('torch', 'alembic', 'openvino') if m in sys.modules)
    sys.stderr.write('\\nREPORT ' + json.dumps([int(status['VmHWM'].split()[0]), heavy]) + '\\n')
atexit.register(report)
sys.argv = ['moderation', 'screen', '--json', sys.argv[1]]
runpy.run_module('moderation', run_name='__main__', alter_sys=True)
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_one_photo_screen_stays_small(tmp_path: Path) -> None:
    """Issue 20 (b): one photo screened by a fresh process under 300 MB peak RSS, loading
    neither torch, Alembic (schema already current) nor OpenVINO (a one-photo job runs on ONNX
    Runtime: :func:`moderation.signals.encoders.runtime_for_job`)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODERATION_")}
    env.update(
        MODERATION_DATA_DIR=str(tmp_path / "var"),
        MODERATION_LOG_LEVEL="WARNING",
        PYTHONPATH=str(REPO),
    )
    photo = str(skimage_photo_path("coffee"))
    run = [sys.executable, "-m", "moderation"]
    subprocess.run([*run, "init"], env=env, check=True, capture_output=True, timeout=600)
    subprocess.run([*run, "screen", photo], env=env, check=True, capture_output=True, timeout=600)
    result = subprocess.run(
        [sys.executable, "-c", _PEAK, photo],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout)["decision"] == "allow"
    line = next(x for x in result.stderr.splitlines() if x.startswith("REPORT "))
    peak_kb, heavy = json.loads(line.removeprefix("REPORT "))
    assert heavy == []
    assert peak_kb < 300 * 1024, f"peak RSS {peak_kb / 1024:.0f} MB"
