"""Pick a kernel form worth a model run from a `decode_kernel.py` log: the variant whose name matches
--match (a regular expression, whole name) with the least time summed over every context, printed
if that sum is at most --at-most times --base's (both correct, rel. err < 2e-2, at every context);
nothing printed otherwise. Used by the device scripts to decide a throughput A/B.

    python benchmarks/kernel_pick.py LOG --base "mosaic fp8 ..." --match "mosaic fp8 ...,heads_per_program=\\d+" --at-most 0.97
"""

from __future__ import annotations

import argparse
import json
import re


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("log")
    ap.add_argument("--base", required=True)
    ap.add_argument("--match", required=True)
    ap.add_argument("--at-most", type=float, required=True)
    args = ap.parse_args()
    rows = [json.loads(line) for line in open(args.log) if line.startswith("{")]
    contexts = {r["ctx"] for r in rows if "ctx" in r}
    times: dict[str, list[float]] = {}
    for r in rows:
        if "us" in r and r["rel_err"] < 2e-2:
            times.setdefault(r["variant"], []).append(r["us"])
    total = {k: sum(v) for k, v in times.items() if len(v) == len(contexts)}
    base = total.get(args.base)
    cands = {k: v for k, v in total.items() if k != args.base and re.fullmatch(args.match, k)}
    best = min(cands, key=cands.get) if cands else None
    if base and best and cands[best] <= args.at_most * base:
        print(best)


if __name__ == "__main__":
    main()
