#!/usr/bin/env bash
# `moderation screen` against the naive script (scripts/naive_screen.py), both timed as whole
# commands (interpreter start, imports, model load, decode, embed, search, output) on the same
# files: a bank of the first BANK_N photos, the first QUERY_N photos screened (so the bank's
# photos come back as blocks and the rest as allows). Set-up is not timed: `moderation init` +
# `bank import` in a temporary MODERATION_DATA_DIR, and the naive script's bank embeddings.
# Runs alternate (naive, screen, naive, screen, ...) so machine load drifts hit both; medians.
#
#   scripts/bench_screen_vs_naive.sh [IMAGES_DIR]     (default ../shared/data/photos-dev)
#   env: PYTHON (default .venv/bin/python), BANK_N=100, QUERY_N=240, REPEATS=3
set -euo pipefail
cd "$(dirname "$0")/.."
IMAGES=${1:-../shared/data/photos-dev}
PY=${PYTHON:-.venv/bin/python}
BANK_N=${BANK_N:-100}
QUERY_N=${QUERY_N:-240}
REPEATS=${REPEATS:-3}

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
"$PY" -m moderation init > /dev/null 2>&1
"$PY" -m moderation bank create known-bad --kind block --category default > /dev/null
"$PY" -m moderation bank import known-bad "${bank[@]}" > /dev/null 2>&1
"$PY" scripts/naive_screen.py embed-bank "$work/bank.npy" "${bank[@]}" 2> /dev/null

now() { date +%s.%N; }
naive_times=()
screen_times=()
for run in $(seq "$REPEATS"); do
    t0=$(now)
    "$PY" scripts/naive_screen.py screen "$work/bank.npy" "${queries[@]}" \
        > "$work/naive.jsonl" 2> /dev/null
    t1=$(now)
    "$PY" -m moderation screen --json "${queries[@]}" > "$work/screen.jsonl" 2> /dev/null
    t2=$(now)
    naive_times+=("$(echo "$t1 - $t0" | bc)")
    screen_times+=("$(echo "$t2 - $t1" | bc)")
    echo "run $run: naive $(printf %.2f "${naive_times[-1]}") s, moderation screen" \
        "$(printf %.2f "${screen_times[-1]}") s"
done

"$PY" - "$work" "${naive_times[*]}" "${screen_times[*]}" "${#queries[@]}" <<'PY'
import json, statistics, sys
from pathlib import Path

work, naive, screen, n = Path(sys.argv[1]), sys.argv[2].split(), sys.argv[3].split(), int(sys.argv[4])
naive_s = statistics.median(map(float, naive))
screen_s = statistics.median(map(float, screen))
def decisions(name):
    rows = [json.loads(line) for line in (work / name).read_text().splitlines() if line.strip()]
    return {d: sum(r["decision"] == d for r in rows) for d in ("block", "review", "allow")}
print(f"naive script     : {naive_s:6.2f} s  ({n / naive_s:5.1f} images/s)  {decisions('naive.jsonl')}")
print(f"moderation screen: {screen_s:6.2f} s  ({n / screen_s:5.1f} images/s)  {decisions('screen.jsonl')}")
print(f"ratio (naive time / screen time): {naive_s / screen_s:.2f}x")
PY
