"""Learning curves of several runs side by side: the label-free signal of issue 28.

train_realnet.py --val-fraction writes val.jsonl: the held-out validation (synthetic
anomalies on held-out TRAINING images, never a test split) at every --val-every steps. This
script draws one panel per category with one curve per run, so that runs before and after a
change can be compared, and prints the values at chosen steps as a markdown table.

    python3 benchmarks/learning_curves.py \\
        --curve "granite:C=0=runs/old/granite/seed1/realnet" \\
        --curve "granite:C=1.5=runs/new/granite/seed1/realnet" \\
        --out benchmarks/results/learning_curves

A curve is CATEGORY:LABEL=PATH, PATH a run folder holding val.jsonl or the file itself. A
curve known only at a few steps (e.g. copied from a committed table) is given as
CATEGORY:LABEL=step:value,step:value,... Writes OUT.png and OUT.json.
"""

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from realnet import cli, runs, viz  # noqa: E402
from realnet.cli import UserError  # noqa: E402
from realnet.files import atomic_save_image, atomic_write_json  # noqa: E402
from realnet.validation import VAL_LOG, VAL_METRICS  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--curve",
        action="append",
        required=True,
        help="CATEGORY:LABEL=PATH (a run folder or its val.jsonl) or "
        "CATEGORY:LABEL=step:value,...; repeat",
    )
    p.add_argument(
        "--metric",
        default="pixel_auroc",
        choices=sorted(VAL_METRICS),
        help="the held-out metric drawn",
    )
    p.add_argument(
        "--steps",
        type=int,
        nargs="+",
        default=[500, 1000, 1500],
        help="steps printed in the table (the last logged step if a run stopped short)",
    )
    p.add_argument("--out", required=True, help="OUT.png and OUT.json are written")
    return p.parse_args(argv)


def read_curve(spec, metric):
    """CATEGORY:LABEL=SOURCE as (category, label, steps, values)."""
    head, sep, source = spec.rpartition("=")  # a label may hold "=" (C=1.5), a source not
    category, colon, label = head.partition(":")
    if not (sep and colon and category and label and source):
        raise UserError(f"--curve {spec!r}: expected CATEGORY:LABEL=PATH or =step:value,...")
    if os.path.exists(source):
        path = os.path.join(source, VAL_LOG) if os.path.isdir(source) else source
        entries = [e for e in runs.read_log(path) if e.get(metric) is not None]
        if not entries:
            raise UserError(f"--curve {spec!r}: {path!r} holds no {metric}")
        return category, label, [e["step"] for e in entries], [e[metric] for e in entries]
    try:
        points = [tuple(float(v) for v in pair.split(":")) for pair in source.split(",")]
        return category, label, [int(s) for s, _ in points], [v for _, v in points]
    except ValueError:
        raise UserError(f"--curve {spec!r}: {source!r} is neither a path nor step:value,...")


def value_at(steps, values, step):
    """The value at `step`, else at the last logged step before it (a run cut short)."""
    before = [(s, v) for s, v in zip(steps, values) if s <= step]
    return before[-1] if before else (None, None)


def main(argv=None):
    args = parse_args(argv)
    curves = [read_curve(spec, args.metric) for spec in args.curve]
    panels, table = {}, []
    for category, label, steps, values in curves:
        panels.setdefault(category, {})[label] = (steps, values)
        cells = []
        for step in args.steps:
            at, value = value_at(steps, values, step)
            cells.append(
                "-" if at is None else f"{value:.3f}" + ("" if at == step else f" ({at})")
            )
        table.append(f"| {category} | {label} | {' / '.join(cells)} |")
    name = VAL_METRICS[args.metric]
    charts = [
        viz.line_chart(series, f"{category}: held-out validation {name}", "step", name,
                       y_range=(0.4, 1.0))
        for category, series in panels.items()
    ]  # fmt: skip
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    sheet = viz.grid(charts, ncols=2 if len(charts) > 1 else 1)
    atomic_save_image(viz.to_pil(sheet), args.out + ".png")
    command = [
        "python3",
        "benchmarks/learning_curves.py",
        *(sys.argv[1:] if argv is None else argv),
    ]
    atomic_write_json(
        args.out + ".json",
        {
            "command": command,
            "metric": args.metric,
            "curves": [
                {"category": c, "label": label, "steps": s, "values": v}
                for c, label, s, v in curves
            ],
        },
    )
    steps = " / ".join(str(s) for s in args.steps)
    print(f"| category | run | held-out {name} at steps {steps} |\n|---|---|---|")
    print("\n".join(table))
    print(f"wrote {args.out}.png and {args.out}.json")


if __name__ == "__main__":
    cli.run(main)
