"""The interleaved A/B runs of `scripts/gpu.sh ab` / `ab_long` (ab.txt, ab_long.txt) as one table:
each variant's tok/s per metric (the mean over its rounds, and the rounds' spread) and its change
against `old` (the --old build) in the same lease.

    python3 scripts/ab_table.py RESULTS/ab_long.txt [RESULTS/ab.txt ...]

A line of those files: `LABEL: METRIC VALUE METRIC VALUE ...` (LABEL old, new, or new[SWITCHES]),
or `LABEL: TIMEOUT ...` where a run hung (listed under the table).
"""
import sys
from collections import OrderedDict


def parse(lines):
    """{label: {metric: [values in round order]}}, labels and metrics in first-seen order."""
    runs = OrderedDict()
    for line in lines:
        label, sep, rest = line.partition(": ")
        words = rest.split()
        if not sep or len(words) < 2 or len(words) % 2:
            continue
        row = runs.setdefault(label.strip(), OrderedDict())
        for metric, value in zip(words[::2], words[1::2]):
            try:
                row.setdefault(metric, []).append(float(value))
            except ValueError:
                pass
    return runs


def table(runs):
    metrics = list(OrderedDict.fromkeys(m for row in runs.values() for m in row))
    base = runs.get("old", {})
    out = [f"{'metric':<22}{'variant':<36}{'tok/s':>11}{'spread':>8}{'vs old':>9}"]
    for m in metrics:
        b = base.get(m)
        b_mean = sum(b) / len(b) if b else None
        for label, row in runs.items():
            v = row.get(m)
            if not v:
                continue
            mean = sum(v) / len(v)
            spread = (max(v) - min(v)) / mean * 100 if mean else 0.0
            vs = f"{(mean / b_mean - 1) * 100:+.1f}%" if b_mean and label != "old" else ""
            out.append(f"{m:<22}{label:<36}{mean:>11.1f}{spread:>7.1f}%{vs:>9}")
    return "\n".join(out)


def main(paths):
    if not paths:
        print(__doc__.strip())
        return 2
    for p in paths:
        with open(p) as f:
            runs = parse(f)
        print(f"== {p}")
        print(table(runs) if runs else "(no runs)")
        with open(p) as f:
            for line in f:
                if ": TIMEOUT" in line:
                    print("  " + line.strip())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
