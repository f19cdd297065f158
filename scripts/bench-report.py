#!/usr/bin/env python3
"""Prints one table of the criterion estimates under a criterion directory.

Each row is one benchmark: its median time per iteration, its throughput when
the group declares one, its speed against the fastest in-run baseline of its
group (same group and parameter; the baselines are the peers named in
BASELINES below), and its change against the previous run kept in --history.

    python3 scripts/bench-report.py target/criterion --out FILE --history DIR
"""
import argparse
import json
import os
import shutil
import sys

# Function names that are peers, not snug: a row's ratio is taken against the
# fastest of these in its group and parameter. `vec_with_capacity` is left out
# on purpose: it never touches its memory, so it is no fair peer for a pool
# that hands out touched memory.
BASELINES = {
    "mutex_counter",         # mem_budget: a Mutex<u64> counter
    "mpsc_per_request_reply",  # batcher: a channel round trip per request
    "direct_one_at_a_time",  # batcher: calling the model per item
    "vec_zeroed",            # buffer_pool: vec![0; n]
    "moka",                  # cache
    "mutex_lru",             # cache: Mutex<lru::LruCache>
    "rayon",                 # quant: fork-join through rayon
    "candle",                # quant: candle's QMatMul
    "q8_0 candle",           # quant: candle's Q8_0 QMatMul at MiniLM shapes
    "f32",                   # quant: candle's f32 matmul
}
# Peers shown for reference but never taken as the row's baseline.
REFERENCE_ONLY = {"vec_with_capacity"}


def load(root):
    rows = {}
    for dirpath, _dirs, files in os.walk(root):
        if os.path.basename(dirpath) != "new" or "estimates.json" not in files:
            continue
        with open(os.path.join(dirpath, "benchmark.json")) as f:
            bench = json.load(f)
        with open(os.path.join(dirpath, "estimates.json")) as f:
            est = json.load(f)
        rows[bench["full_id"]] = {
            "group": bench["group_id"],
            "function": bench.get("function_id") or "",
            "value": bench.get("value_str") or "",
            "throughput": bench.get("throughput"),
            "median_ns": est["median"]["point_estimate"],
            "mean_ns": est["mean"]["point_estimate"],
        }
    return rows


def fmt_time(ns):
    for unit, scale in (("s", 1e9), ("ms", 1e6), ("µs", 1e3)):
        if ns >= scale:
            return f"{ns / scale:.3g} {unit}"
    return f"{ns:.3g} ns"


def fmt_throughput(tp, ns):
    if not tp:
        return ""
    (kind, n), = tp.items()
    per_s = n / (ns / 1e9)
    if kind == "Bytes":
        return f"{per_s / 2**30:.3g} GiB/s"
    return f"{per_s / 1e6:.3g} M/s"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("root")
    ap.add_argument("--out", required=True)
    ap.add_argument("--history")
    args = ap.parse_args()
    rows = load(args.root)
    if not rows:
        sys.exit(f"bench-report: no criterion estimates under {args.root}")

    previous = {}
    last = os.path.join(args.history, "last.json") if args.history else None
    if last and os.path.exists(last):
        with open(last) as f:
            previous = json.load(f).get("benchmarks", {})

    # A peer's slot: its id with its own name replaced by "*" (the names sit
    # in different places of the id in different benches).
    def slots(full_id):
        parts = full_id.split("/")
        for i in range(len(parts)):
            yield "/".join(parts[:i] + ["*"] + parts[i + 1:]), parts[i]

    best_base = {}
    for full_id, r in rows.items():
        for slot, name in slots(full_id):
            if name in REFERENCE_ONLY:
                r["peer"] = True
            if name in BASELINES:
                r["peer"] = True
                if slot not in best_base or r["median_ns"] < rows[best_base[slot]]["median_ns"]:
                    best_base[slot] = full_id

    header = f"{'benchmark':<58} {'median':>10} {'throughput':>12} {'vs best peer in run':>30} {'change':>8}"
    print(header)
    print("-" * len(header))
    for full_id in sorted(rows):
        r = rows[full_id]
        ratio = ""
        if r.get("peer"):
            ratio = "(peer)"
        else:
            for slot, _name in slots(full_id):
                if slot in best_base:
                    b = rows[best_base[slot]]
                    peer = [n for _s, n in slots(best_base[slot]) if n in BASELINES][0]
                    ratio = f"{b['median_ns'] / r['median_ns']:.2f}x {peer}"
                    break
        change = ""
        if full_id in previous:
            change = f"{(r['median_ns'] / previous[full_id]['median_ns'] - 1) * 100:+.0f}%"
        print(f"{full_id:<58} {fmt_time(r['median_ns']):>10} "
              f"{fmt_throughput(r['throughput'], r['median_ns']):>12} {ratio:>30} {change:>8}")
    print("\nratio: the peer's median time over ours (above 1: ours is faster); "
          "change: against the previous run on this machine "
          f"({'none kept' if not previous else last}).")

    doc = {"benchmarks": rows}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(doc, f, indent=1, sort_keys=True)
    if args.history:
        os.makedirs(args.history, exist_ok=True)
        if os.path.exists(last):
            shutil.copyfile(last, os.path.join(args.history, "previous.json"))
        shutil.copyfile(args.out, last)
        print(f"estimates kept in {args.out} and {last}")


if __name__ == "__main__":
    main()
