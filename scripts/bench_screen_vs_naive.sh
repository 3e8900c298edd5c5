#!/usr/bin/env bash
# `moderation screen` against the naive script (scripts/naive_screen.py), both timed as whole
# commands (interpreter start, imports, model load, decode, embed, search, output) on the same
# files: a bank of the first BANK_N photos, the first QUERY_N photos screened (so the bank's
# photos come back as blocks and the rest as allows). Set-up is not timed: `moderation init` +
# `bank import` in a temporary MODERATION_DATA_DIR, and the naive script's bank embeddings.
# Runs alternate (naive, screen, naive, screen, ...) so machine load drifts hit both; medians of
# wall seconds and of CPU seconds (user + system of each command's process tree, from
# /usr/bin/time; on a shared, loaded machine the CPU ratio is the steadier one), and each
# command's peak RSS.
#
#   scripts/bench_screen_vs_naive.sh [IMAGES_DIR]     (default ../shared/data/photos-dev)
#   env: PYTHON (default .venv/bin/python), BANK_N=100, QUERY_N=240, REPEATS=5
set -euo pipefail
cd "$(dirname "$0")/.."
IMAGES=${1:-../shared/data/photos-dev}
PY=${PYTHON:-.venv/bin/python}
BANK_N=${BANK_N:-100}
QUERY_N=${QUERY_N:-240}
REPEATS=${REPEATS:-5}

work=$(mktemp -d -t moderation-screen-vs-naive-XXXXXX)
trap 'rm -rf "$work"' EXIT
export MODERATION_DATA_DIR=$work/var
export MODERATION_LOG_LEVEL=WARNING
unset MODERATION_MASTER_KEYS MODERATION_DATABASE_URL MODERATION_BROKER_URL

mapfile -t files < <(find "$IMAGES" -maxdepth 1 -type f \
    \( -iname '*.jpg' -o -iname '*.jpeg' -o -iname '*.png' \) | sort)
if (( ${#files[@]} < QUERY_N || ${#files[@]} < BANK_N )); then
    echo "need at least max($BANK_N, $QUERY_N) images in $IMAGES, found ${#files[@]}" >&2
    exit 2
fi
bank=("${files[@]:0:BANK_N}")
queries=("${files[@]:0:QUERY_N}")

echo "set-up (untimed): bank of ${#bank[@]} photos, ${#queries[@]} queries from $IMAGES"
# Bytecode for the package, as `pip install` writes it: run from a checkout with
# PYTHONDONTWRITEBYTECODE set, every run would otherwise compile about a hundred modules again
# (0.1-0.2 s of CPU). The naive script's libraries come installed, so compiled, already.
"$PY" -m compileall -q moderation > /dev/null
"$PY" -m moderation init > /dev/null 2>&1
"$PY" -m moderation bank create known-bad --kind block --category default > /dev/null
"$PY" -m moderation bank import known-bad "${bank[@]}" > /dev/null 2>&1
"$PY" scripts/naive_screen.py embed-bank "$work/bank.npy" "${bank[@]}" 2> /dev/null

# Each timed command appends "wall user sys maxrss_kB" to its own file.
timed() { /usr/bin/time -a -o "$1" -f "%e %U %S %M" "${@:2}"; }
for run in $(seq "$REPEATS"); do
    timed "$work/naive.times" "$PY" scripts/naive_screen.py screen "$work/bank.npy" \
        "${queries[@]}" > "$work/naive.jsonl" 2> /dev/null
    timed "$work/screen.times" "$PY" -m moderation screen --json "${queries[@]}" \
        > "$work/screen.jsonl" 2> /dev/null
    echo "run $run: naive $(tail -n1 "$work/naive.times" | cut -d' ' -f1) s," \
        "moderation screen $(tail -n1 "$work/screen.times" | cut -d' ' -f1) s (wall)"
done

"$PY" - "$work" "${#queries[@]}" <<'PY'
import json, os, statistics, sys
from pathlib import Path

work, n = Path(sys.argv[1]), int(sys.argv[2])
def runs(name):
    rows = [line.split() for line in (work / name).read_text().splitlines() if line.strip()]
    return [(float(w), float(u) + float(s), int(m) / 1024) for w, u, s, m in rows]
def decisions(name):
    rows = [json.loads(line) for line in (work / name).read_text().splitlines() if line.strip()]
    return {d: sum(r["decision"] == d for r in rows) for d in ("block", "review", "allow")}
naive, screen = runs("naive.times"), runs("screen.times")
print(f"{len(screen)} runs each, load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
for label, rows, out in (("naive script", naive, "naive.jsonl"), ("moderation screen", screen, "screen.jsonl")):
    wall, cpu, peak = (statistics.median(r[i] for r in rows) for i in range(3))
    print(f"{label:<18}: {wall:6.2f} s wall ({n / wall:5.1f} images/s), {cpu:6.2f} CPU s, "
          f"peak {peak:5.0f} MiB  {decisions(out)}")
for i, what in ((0, "wall"), (1, "CPU")):
    pairwise = statistics.median(a[i] / b[i] for a, b in zip(naive, screen))
    medians = statistics.median(r[i] for r in naive) / statistics.median(r[i] for r in screen)
    print(f"ratio naive / screen, {what:>4} seconds: {medians:.2f}x (medians), "
          f"{pairwise:.2f}x (median of pairwise)")
PY
