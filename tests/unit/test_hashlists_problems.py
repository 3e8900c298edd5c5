"""Hash-list file formats: problems reported with their line numbers, duplicates, caps,
progress and the garbage collector's state.
"""

from __future__ import annotations

import gc
import random
from pathlib import Path

import pytest

from moderation.banks.hashlists import parse_hash_list
from moderation.banks.hashlists.records import (
    MAX_PROBLEMS_KEPT,
    PROGRESS_EVERY,
    LineProblem,
)
from tests.unit.conftest import (
    MD5_A,
    PDQ_A,
    PDQ_B,
    SHA256_A,
    ncmec_entry,
    write_list,
)

# --- problems ---------------------------------------------------------------------------


def test_corrupted_lines_are_reported_with_their_numbers(tmp_path: Path) -> None:
    good = [f"{random.Random(i).getrandbits(256):064x}" for i in range(20)]
    lines = list(good)
    lines[16] = good[16][:-1]  # line 17: a character lost
    lines[4] = good[4][:-1] + "g"  # line 5: not hex
    lines[9] = f"{good[9]},abc"  # line 10: bad quality
    parsed = parse_hash_list(write_list(tmp_path, "list.txt", "\n".join(lines) + "\n"), "pdq")
    assert [str(p) for p in parsed.errors] == [
        f"line 5: pdq value must be hex digits, got '{lines[4]}'",
        "line 10: PDQ quality must be an integer 0-100, got 'abc'",
        "line 17: pdq value must be 64 hex characters, got 63",
    ]
    assert len(parsed.records) == 17


@pytest.mark.parametrize("line", ["pdq", PDQ_A, f"{PDQ_A} pdq"])
def test_threatexchange_line_without_a_type_is_an_error(tmp_path: Path, line: str) -> None:
    parsed = parse_hash_list(
        write_list(tmp_path, "te.txt", f"pdq {PDQ_B}\n{line}\n"), "threatexchange"
    )
    assert [p.line for p in parsed.errors] == [2]
    assert "expected 'signal_type signal'" in parsed.errors[0].reason


def test_wrong_length_for_the_declared_type(tmp_path: Path) -> None:
    parsed = parse_hash_list(write_list(tmp_path, "m.txt", f"{MD5_A}\n{SHA256_A}\n"), "md5")
    assert parsed.errors == [LineProblem(2, "md5 value must be 32 hex characters, got 64")]


def test_duplicates_first_line_wins(tmp_path: Path) -> None:
    text = f"{PDQ_A},90,first.jpg\n{PDQ_B}\n{PDQ_A.upper()},70,second.jpg\n{PDQ_A}\n"
    parsed = parse_hash_list(write_list(tmp_path, "p.txt", text), "pdq")
    assert [(r.line, r.label) for r in parsed.records] == [(1, "first.jpg"), (2, "")]
    assert parsed.duplicates == 2


def test_duplicates_across_multi_signal_records(tmp_path: Path) -> None:
    lines = [
        ncmec_entry("a", {"md5": MD5_A}),
        ncmec_entry("b", {"md5": MD5_A, "pdq": PDQ_A}),
        ncmec_entry("c", {"pdq": PDQ_A.upper()}),
    ]
    parsed = parse_hash_list(write_list(tmp_path, "n.jsonl", "\n".join(lines)), "ncmec")
    # Each signal value appears in exactly one record: the first that carried it.
    assert [(r.ref, r.signals) for r in parsed.records] == [
        ("ncmec:a", {"md5": MD5_A}),
        ("ncmec:b", {"pdq": PDQ_A}),
    ]
    assert parsed.duplicates == 1


def test_problem_lists_are_capped(tmp_path: Path) -> None:
    extra = 5
    text = "zz\n" * (MAX_PROBLEMS_KEPT + extra)
    parsed = parse_hash_list(write_list(tmp_path, "junk.txt", text), "md5")
    assert len(parsed.errors) == MAX_PROBLEMS_KEPT
    assert parsed.errors_not_kept == extra


def test_progress_is_reported(tmp_path: Path) -> None:
    rng = random.Random(3)
    count = PROGRESS_EVERY * 2 + 7
    text = "".join(f"{rng.getrandbits(128):032x}\n" for _ in range(count))
    seen: list[int] = []
    parsed = parse_hash_list(write_list(tmp_path, "m.txt", text), "md5", progress=seen.append)
    assert seen == [PROGRESS_EVERY, 2 * PROGRESS_EVERY, count]
    assert len(parsed.records) + parsed.duplicates == count


@pytest.mark.parametrize("enabled", [True, False])
def test_garbage_collector_state_is_restored(tmp_path: Path, enabled: bool) -> None:
    path = write_list(tmp_path, "m.txt", f"{MD5_A}\n")
    was = gc.isenabled()
    try:
        gc.enable() if enabled else gc.disable()
        parse_hash_list(path, "md5")
        assert gc.isenabled() is enabled
    finally:
        gc.enable() if was else gc.disable()


def test_undecodable_bytes_fail_their_line(tmp_path: Path) -> None:
    path = tmp_path / "m.txt"
    path.write_bytes(b"\xef\xbb\xbf" + MD5_A.encode() + b"\n" + b"\xff" * 32 + b"\n")
    parsed = parse_hash_list(path, "md5")
    assert [r.signals["md5"] for r in parsed.records] == [MD5_A]
    assert [p.line for p in parsed.errors] == [2]
