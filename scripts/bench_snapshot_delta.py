"""Issue 16 item 2: adding entries to a large bank as a delta version against a full version.

Usage (from the repository root)::

    PYTHONPATH=$PWD python scripts/bench_snapshot_delta.py [N] [ADDED] [WORKDIR] [--disk]

N (default 1,000,000) generated entries as ``moderation benchmark speed`` generates them
(:class:`moderation.benchmark.speed_index.Generator`; photos and the cached ``real.npy`` as
``scripts/bench_index_memory.py`` finds them), with random PDQ digests, form full version v1:
its stored index (the ``ivf_pca`` one ``CosineIndex.build`` chooses at 1M, built chunk by
chunk) in an encrypted snapshot, as :func:`moderation.banks.versions.commit_signals` writes
it. Then ADDED (default 1,000) more entries are written and picked up both ways:

* writer, delta: the delta payload (segment of the added entries) encrypted and written
  (:func:`moderation.banks.delta_chain.write_delta` less its two SQL queries);
* writer, flag delta: ADDED entries of v1 disabled as a delta (v1 decrypted, their rows read
  from its stored index, the delta written);
* writer, full: what a full version costs at least: v1's own writing (the index built over
  N entries, chunked here to fit a shared machine's memory, where ``commit_signals`` decodes
  every vector and builds in one call; serialised, encrypted, written; N + ADDED entries cost
  0.1% more), plus decrypting and parsing the current version first (measured once);
* worker, full reload: the full version decrypted, parsed, its stored index loaded in place,
  the PDQ index and the blocklist built (:func:`moderation.banks.blocklist.load_blocklist` less
  its entry-metadata query);
* worker, delta: :meth:`Blocklist.apply_delta` after the delta is verified and decrypted
  (:func:`moderation.banks.delta_chain.read_delta`), twice: the first copies a zero-copy stored
  index out of the decrypted snapshot once, the second shows every later delta.

With ``--disk`` v1's index is an ``ivf_disk`` one (forced at any N; rows in an encrypted
row file beside the snapshot, as a bank of 1M+ entries gets): the delta's added rows are then
held in RAM beside the read-only row file, and one more figure is printed, compaction of the
chain (v1 + both deltas) streamed into a new row file with v1's training reused
(:func:`moderation.banks.disk_compaction.streamed_index`), against v1's own build.

Prints one line per figure and a JSON summary. Not a pytest: a measurement tool, run by hand.
"""

from __future__ import annotations

import gc
import itertools
import json
import resource
import secrets
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from moderation.banks.blocklist import Blocklist, _build
from moderation.banks.delta_chain import read_delta
from moderation.banks.disk_compaction import streamed_index
from moderation.banks.flag_delta import _image_signals
from moderation.banks.index import CosineIndex, load_index
from moderation.banks.index.cosine_projection import ivf_nlist
from moderation.banks.records import EntryInfo
from moderation.banks.snapshot import SnapshotFile, read_snapshot, write_snapshot
from moderation.banks.snapshot_delta import DeltaPayload, without_embeddings
from moderation.banks.snapshot_payload import EntrySignals, Payload
from moderation.benchmark import speed_index as si
from moderation.crypto.keys import KeyRing
from moderation.storage.models import IndexSnapshot
from scripts.bench_index_memory import real_embeddings

ENCODER = "bench"
DISK = "--disk" in sys.argv


def _build_disk(gen: si.Generator, n: int, work: Path) -> CosineIndex:
    """``si._build``'s chunked build, as an ``ivf_disk`` index writing ``work/full1.rows``."""
    (work / "full1.rows").unlink(missing_ok=True)
    first = np.concatenate([block for _, block in itertools.islice(gen.chunks(n), 5)])
    index = CosineIndex.build(
        np.arange(len(first)),
        first,
        algorithm="ivf_disk",
        nlist=ivf_nlist(n),
        row_dir=work,
        row_name="full1.rows",
    )
    del first
    for chunk_start, block in itertools.islice(gen.chunks(n), 5, None):
        index.add(np.arange(chunk_start, chunk_start + len(block)), block)
    return index


def _pdq(start: int, count: int) -> np.ndarray:
    return np.random.default_rng((si.SEED, start, 2)).integers(0, 256, (count, 32), np.uint8)


def _full_payload(index: CosineIndex, n: int) -> bytes:
    payload = Payload.empty(ENCODER, 1280)
    payload.entry_ids = np.arange(n, dtype=np.int64)
    payload.pdq = _pdq(0, n)
    payload.pdq_quality = np.full(n, 100, np.uint8)
    payload.active = np.ones(n, np.bool_)
    payload.cosine_index = index.serialize()
    payload.vectors_in_index = True  # every entry active: no rows outside the index
    return payload.to_bytes()


def _signals(gen: si.Generator, start: int, count: int) -> list[EntrySignals]:
    vectors, digests = gen.chunk(start, count), _pdq(start, count)
    return [EntrySignals(start + i, vectors[i], digests[i].tobytes(), 100) for i in range(count)]


def _row(written: SnapshotFile, base: int | None) -> IndexSnapshot:
    return IndexSnapshot(
        version=written.version,
        snapshot_id=written.snapshot_id,
        encoder_id=ENCODER,
        key_id=written.key_id,
        sha256=written.sha256,
        path=str(written.path),
        base_version=base,
    )


def _write_delta(
    work: Path, ring: KeyRing, gen: si.Generator, start: int, added: int, version: int
) -> tuple[float, IndexSnapshot]:
    began = time.perf_counter()
    delta = DeltaPayload.of_change(version - 1, ENCODER, 1280, added=_signals(gen, start, added))
    written = write_snapshot(
        work,
        delta.to_bytes(),
        snapshot_id=f"d{version}",
        version=version,
        encoder_id=ENCODER,
        keyring=ring,
    )
    return time.perf_counter() - began, _row(written, version - 1)


def _read_full(row: IndexSnapshot, ring: KeyRing) -> Payload:
    data = read_snapshot(
        Path(row.path),
        ring,
        expected_snapshot_id=row.snapshot_id,
        expected_version=row.version,
        expected_encoder_id=ENCODER,
        expected_sha256=row.sha256,
    )
    payload = Payload.from_bytes(data)
    payload.row_dir = Path(row.path).parent
    return payload


def _flag_write(work: Path, ring: KeyRing, base: IndexSnapshot, count: int) -> float:
    """A flag delta disabling ``count`` entries of v1 (:func:`moderation.banks.flag_delta.
    flag_delta` less its entry-flag query): v1 decrypted, their rows read from its stored
    index (``ivf_disk``: from its row file), the delta encrypted and written."""
    began = time.perf_counter()
    payload = _read_full(base, ring)
    ids = payload.entry_ids[:: max(1, len(payload.entry_ids) // count)][:count]
    signals = _image_signals(without_embeddings(payload), payload, [], ids)
    delta = DeltaPayload.of_change(1, ENCODER, 1280, added=signals, tombstones=ids.tolist())
    write_snapshot(
        work, delta.to_bytes(), snapshot_id="f9", version=9, encoder_id=ENCODER, keyring=ring
    )
    return time.perf_counter() - began


def _infos(ids: range) -> dict[int, EntryInfo]:
    return {i: EntryInfo(i, 1, "bench", "image", "bench", "bench") for i in ids}


def _reload(
    base: IndexSnapshot, ring: KeyRing, infos: dict[int, EntryInfo]
) -> tuple[float, Blocklist]:
    began = time.perf_counter()
    payload = _read_full(base, ring)
    blocklist = _build(base, payload, infos, version=base.version)
    return time.perf_counter() - began, blocklist


def _pick_up(
    work: Path, ring: KeyRing, blocklist: Blocklist, row: IndexSnapshot, start: int, added: int
) -> float:
    began = time.perf_counter()
    delta = read_delta(ring, work, row, base_version=blocklist.version)
    blocklist.apply_delta(row, delta, _infos(range(start, start + added)), None)
    return time.perf_counter() - began


def _compact(work: Path, blocklist: Blocklist, gen: si.Generator, n: int, added: int) -> float:
    """Seconds to stream v1's rows and both deltas' into a new ``ivf_disk`` index (v1's
    training reused; :mod:`moderation.banks.disk_compaction`), printed with the CPU seconds
    and the peak resident memory so far."""
    assert blocklist.payload.cosine_index is not None
    gc.collect()
    stored = load_index(blocklist.payload.cosine_index, authenticated=True, row_dir=work)
    assert isinstance(stored, CosineIndex)
    (work / "compacted.rows").unlink(missing_ok=True)
    ids, vectors = np.arange(n, n + 2 * added, dtype=np.int64), gen.chunk(n, 2 * added)
    began, cpu = time.perf_counter(), time.process_time()
    compacted = streamed_index(stored, work / "compacted.rows", np.arange(n), ids, vectors)
    took, cpu = time.perf_counter() - began, time.process_time() - cpu
    assert len(compacted) == n + 2 * added
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    print(
        f"compaction, streamed ({n + 2 * added:,} rows, no retraining): {took:.1f} s "
        f"({cpu:.1f} CPU s); process peak RSS so far {peak:.2f} GB"
    )
    return round(took, 1)


def _full_version(work: Path, gen: si.Generator, n: int) -> tuple[KeyRing, SnapshotFile, float]:
    """Full version v1 of ``n`` entries, its key ring and the seconds it took to build and
    write; reused from ``work`` when an earlier run of the same N left it there."""
    keys, record = work / "bench-keys.json", work / f"full1-{n}{'-disk' if DISK else ''}.json"
    if keys.exists() and record.exists():
        saved = json.loads(record.read_text())
        file = SnapshotFile(**{**saved["file"], "path": Path(saved["file"]["path"])})
        return KeyRing.load_file(keys), file, float(saved["build_s"])
    ring = KeyRing({"bench": secrets.token_bytes(32)}, "bench")
    began, cpu = time.perf_counter(), time.process_time()
    plain = _full_payload(_build_disk(gen, n, work) if DISK else si._build(gen, n), n)
    full = write_snapshot(
        work, plain, snapshot_id="full1", version=1, encoder_id=ENCODER, keyring=ring
    )
    build_s = time.perf_counter() - began
    print(f"v1 built, encrypted, written: {build_s:.1f} s ({time.process_time() - cpu:.1f} CPU s)")
    del plain
    gc.collect()
    ring.save_file(keys)
    file = {**full.__dict__, "path": str(full.path)}
    record.write_text(json.dumps({"file": file, "build_s": build_s}))
    return ring, full, build_s


def main(n: int, added: int, work: Path) -> dict[str, Any]:
    gen = si.Generator(real_embeddings(work))
    ring, full, build_s = _full_version(work, gen, n)
    base = _row(full, None)
    began = time.perf_counter()
    assert len(_read_full(base, ring).entry_ids) == n
    decrypt_s = time.perf_counter() - began
    gc.collect()
    full_s = build_s + decrypt_s
    print(
        f"writer: full version of {n:,}: {full_s:.1f} s (decrypt current {decrypt_s:.1f} s, "
        f"build + encrypt + write {build_s:.1f} s; {full.size_bytes / 1e9:.2f} GB)",
        flush=True,
    )
    delta_s, d2 = _write_delta(work, ring, gen, n, added, 2)
    _, d3 = _write_delta(work, ring, gen, n + added, added, 3)
    print(f"writer: delta of {added:,} added: {delta_s:.3f} s ({Path(d2.path).stat().st_size:,} B)")
    flags_s = _flag_write(work, ring, base, added)
    print(f"writer: flag delta disabling {added:,}: {flags_s:.2f} s (v1 decrypted included)")
    reload_s, blocklist = _reload(base, ring, _infos(range(n)))
    print(f"worker: full reload of {n:,}: {reload_s:.2f} s", flush=True)
    first_s = _pick_up(work, ring, blocklist, d2, n, added)
    second_s = _pick_up(work, ring, blocklist, d3, n + added, added)
    assert len(blocklist.cosine) == n + 2 * added and blocklist.version == 3
    # Held by the index (its stored code decodes back to the vector); search recall among
    # the generator's near-identical entries is the index benchmark's business.
    stored = blocklist.cosine.reconstruct([n + added])[0]
    assert float(stored @ gen.chunk(n + added, added)[0]) > 0.99, "the delta's entry is indexed"
    print(
        f"worker: delta pick-up of {added:,}: first {first_s:.3f} s (copies the zero-copy "
        f"index once), next {second_s:.3f} s"
    )
    figures = {"compaction_streamed_s": _compact(work, blocklist, gen, n, added)} if DISK else {}
    return {
        **figures,
        "algorithm": blocklist.cosine.algorithm,
        "entries": n,
        "added": added,
        "delta_write_s": round(delta_s, 4),
        "flag_delta_write_s": round(flags_s, 3),
        "full_write_s": round(full_s, 1),
        "full_reload_s": round(reload_s, 2),
        "delta_pickup_first_s": round(first_s, 3),
        "delta_pickup_next_s": round(second_s, 4),
        "delta_bytes": Path(d2.path).stat().st_size,
        "full_bytes": full.size_bytes,
    }


if __name__ == "__main__":
    args = [arg for arg in sys.argv[1:] if arg != "--disk"]
    size = int(args[0]) if args else 1_000_000
    count = int(args[1]) if len(args) > 1 else 1_000
    folder = Path(args[2]) if len(args) > 2 else Path(tempfile.mkdtemp(prefix="delta-"))
    print(json.dumps(main(size, count, folder)))
