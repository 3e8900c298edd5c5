#!/usr/bin/env python
"""Compare two settings' ``moderation benchmark --json`` outputs, pooled over seeds.

Each side is a list of JSON files (one per seed, the same seeds on both sides, in the same
order). Prints per method and split (the main table and "unseen implementations") the mean µAP
and R@P99 of each side, the families whose flagged share changed (pooled: the mean of the
per-seed shares, so 20 positives per family and seed give steps of 0.05 / seeds), the unrelated
photos blocked per seed, and how many classifier decisions changed between paired queries.
The quality rule of issue 20 (µAP within 0.005, no family down by more than 0.02) is checked,
its verdict printed last; the exit status is 1 when it is broken.

    python scripts/compare_benchmark_runs.py --a s0-f32.json s1-f32.json s2-f32.json \\
        --b s0-bf16.json s1-bf16.json s2-bf16.json
"""

from __future__ import annotations

import argparse
import json
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

#: Issue 20's rule for a cheaper arithmetic: µAP within this of the reference ...
MAX_MICRO_AP_LOSS = 0.005
#: ... and no edit family's flagged share down by more than this.
MAX_FAMILY_LOSS = 0.02


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean µAP / R@P99 per (split, method), mean family shares, blocked negatives per run."""
    scores: dict[tuple[str, str], list[tuple[float, float]]] = defaultdict(list)
    families: dict[tuple[str, str, str], list[float]] = defaultdict(list)
    blocked: dict[str, list[int]] = defaultdict(list)
    for run in runs:
        for method in run["methods"]:
            scores[("main", method["name"])].append((method["micro_ap"], method["recall_at_p99"]))
            for family, share in method["per_edit_recall"].items():
                families[("main", method["name"], family)].append(share)
        for method in run["unseen_implementations"]["methods"]:
            key = ("unseen", method["name"])
            scores[key].append((method["micro_ap"], method["recall_at_p99"]))
            for family, share in method["family_flagged"].items():
                families[("unseen", method["name"], family)].append(share)
            if method.get("unrelated_blocked") is not None:
                blocked[method["name"]].append(method["unrelated_blocked"])
    mean = {k: tuple(sum(x[i] for x in v) / len(v) for i in range(2)) for k, v in scores.items()}
    shares = {k: sum(v) / len(v) for k, v in families.items()}
    return {"scores": mean, "families": shares, "blocked": dict(blocked)}


def changed_decisions(a: dict[str, Any], b: dict[str, Any]) -> Counter[tuple[str, str, str]]:
    """(positive or negative, decision in a, decision in b) counts of the classifier's
    decisions that differ between two runs of the same seed (main split)."""

    def decisions(run: dict[str, Any]) -> dict[str, str]:
        return {
            p["query_id"]: p["decision"]
            for m in run["methods"]
            if m["name"] == "classifier"
            for p in m["predictions"]
        }

    left, right = decisions(a), decisions(b)
    return Counter(
        (query.split("/")[1], left[query], right[query])
        for query in left
        if query in right and left[query] != right[query]
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--a", nargs="+", type=Path, required=True, help="reference runs")
    parser.add_argument("--b", nargs="+", type=Path, required=True, help="candidate runs")
    args = parser.parse_args()
    if len(args.a) != len(args.b):
        parser.error("give as many runs (seeds) on each side")
    runs_a = [json.loads(p.read_text()) for p in args.a]
    runs_b = [json.loads(p.read_text()) for p in args.b]
    a, b = summarise(runs_a), summarise(runs_b)
    failures = []
    for key, (ap_a, r_a) in sorted(a["scores"].items()):
        ap_b, r_b = b["scores"][key]
        print(
            f"{key[0]:6s} {key[1]:14s} µAP {ap_a:.4f} -> {ap_b:.4f} ({ap_b - ap_a:+.4f})  "
            f"R@P99 {r_a:.3f} -> {r_b:.3f} ({r_b - r_a:+.3f})"
        )
        if ap_b < ap_a - MAX_MICRO_AP_LOSS:
            failures.append(f"{key}: µAP {ap_a:.4f} -> {ap_b:.4f}")
    for key, share_a in sorted(a["families"].items(), key=lambda kv: b["families"][kv[0]] - kv[1]):
        share_b = b["families"][key]
        if abs(share_b - share_a) > 1e-9:
            print(f"  family {key[0]:6s} {key[1]:14s} {key[2]:16s} {share_a:.3f} -> {share_b:.3f}")
        if share_b < share_a - MAX_FAMILY_LOSS - 1e-9:
            failures.append(f"{key}: {share_a:.3f} -> {share_b:.3f}")
    for name, counts in a["blocked"].items():
        print(f"unrelated blocked (unseen, {name}): {counts} -> {b['blocked'].get(name)}")
    changes: Counter[tuple[str, str, str]] = Counter()
    for left, right in zip(runs_a, runs_b, strict=True):
        changes += changed_decisions(left, right)
    total = sum(
        len(m["predictions"]) for r in runs_a for m in r["methods"] if m["name"] == "classifier"
    )
    print(f"classifier decisions changed: {sum(changes.values())} of {total}: {dict(changes)}")
    print("rule: " + ("kept" if not failures else "broken: " + "; ".join(failures)))
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
