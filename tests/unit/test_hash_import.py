"""Hash-list import and export through a bank: what goes in comes back out."""

from __future__ import annotations

import io
from pathlib import Path

from moderation.banks.hash_export import export_hashes
from moderation.banks.hash_import import import_hash_list
from moderation.banks.records import create_bank
from moderation.service.runtime import Runtime
from moderation.storage.db import transaction

PDQ_A = "f8f8f0cee0f4a84f06370a22038f63f0b36e2ed596621e1d33e6b39c4e9c9b22"
MD5_A = "cab08b36195edb1a1231d2d09fa450e0"


def test_imported_hashes_export_back(runtime: Runtime, tmp_path: Path) -> None:
    with transaction(runtime.sessions) as db:
        create_bank(db, "shared")
    path = tmp_path / "list.txt"
    path.write_text(f"pdq {PDQ_A}\nvideo_md5 {MD5_A}\n", encoding="utf-8")
    report = import_hash_list(runtime, "shared", path, actor="test")
    assert (report.format, report.added, report.merged) == ("threatexchange", 2, 0)
    again = import_hash_list(runtime, "shared", path, actor="test")
    assert (again.added, again.merged) == (0, 2)
    out = io.StringIO()
    assert export_hashes(runtime, "shared", out, fmt="threatexchange", actor="test") == 2
    assert sorted(out.getvalue().splitlines()) == sorted([f"pdq {PDQ_A}", f"video_md5 {MD5_A}"])
