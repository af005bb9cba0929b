"""Markdown table of `cellsam-rt evaluate --images ... --csv FILE` results, one row per image.

    python benchmarks/eval_table.py LABEL=scores.csv [LABEL=scores.csv ...] [--methods M ...]

Each column group is one (csv, method) pair: F1@0.5 / mean matched IoU. Rows follow the first
csv's images; the last row is each column's mean over the images listed (a `--skip` pattern
leaves images out of the mean, marked with *); the mean matched IoU is over the images with at
least one match.
"""
from __future__ import annotations

import argparse
import csv
import fnmatch
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("inputs", nargs="+", help="LABEL=scores.csv")
    p.add_argument("--methods", nargs="*", default=None,
                   help="methods to show (default: every method of each csv)")
    p.add_argument("--skip", action="append", default=[], metavar="PATTERN",
                   help="images left out of the mean (glob), marked with *")
    p.add_argument("--short", type=int, default=48, help="shorten image names to this many characters")
    args = p.parse_args(argv)
    cols, images = [], []
    data = {}
    for item in args.inputs:
        label, _, path = item.partition("=")
        rows = [r for r in csv.DictReader(open(path)) if r["image"] != "mean"]
        for r in rows:
            if r["image"] not in images:
                images.append(r["image"])
            data[(label, r["method"], r["image"])] = r
        for m in dict.fromkeys(r["method"] for r in rows):
            if args.methods is None or m in args.methods:
                cols.append((label, m))
    head = "| image | " + " | ".join(f"{lab}: {m}" for lab, m in cols) + " |"
    out = [head, "| --- " * (len(cols) + 1) + "|"]
    sums = {c: [] for c in cols}
    for img in images:
        skipped = any(fnmatch.fnmatch(img, pat) for pat in args.skip)
        half = (args.short - 1) // 2
        name = img if len(img) <= args.short else img[:half] + "…" + img[-half:]
        cells = []
        for c in cols:
            r = data.get((c[0], c[1], img))
            if r is None:
                cells.append("-")
                continue
            cells.append(f"{float(r['f1@0.5']):.3f} / {float(r['mean_iou']):.3f}")
            if not skipped:
                matched = int(r.get("tp", 1) or 0) > 0
                sums[c].append((float(r["f1@0.5"]), float(r["mean_iou"]) if matched else None))
        out.append(f"| {name}{' *' if skipped else ''} | " + " | ".join(cells) + " |")
    mean_cells = []
    for c in cols:
        v = sums[c]
        ious = [b for _, b in v if b is not None]
        mean_cells.append(f"**{sum(a for a, _ in v) / len(v):.3f} / "
                          f"{sum(ious) / max(len(ious), 1):.3f}**" if v else "-")
    out.append(f"| **mean** ({max(len(v) for v in sums.values())} images) | " + " | ".join(mean_cells) + " |")
    print("\n".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
