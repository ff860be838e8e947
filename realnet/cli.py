"""What every stage script shares at its edges: one-line errors, the shared flags, seeds.

A stage raises `UserError` for anything the user can fix (a missing folder, a checkpoint
made for another configuration, ...). `run(main)` turns it into one line on stderr and
exit code 2, so nobody has to read a traceback to learn that a file is missing.

Every stage has the same shape: `parse_args(argv)` builds its argparse parser (the flags
several stages share come from the `add_*` helpers here, so they have one name and one
meaning everywhere) and `main(argv=None)` runs it; `cli.run(main)` is the entry point.
"""

import math
import os
import random
import sys

import numpy as np
import torch


class UserError(Exception):
    """A problem with the user's input or files. Printed as one line, exit code 2."""


def resolve_device(arg):
    """--device auto | cpu | cuda | cuda:N -> torch.device; a clear error for anything else
    or for CUDA on a machine without it. auto: CUDA when available."""
    if arg not in ("auto", "cpu", "cuda") and not arg.startswith("cuda:"):
        raise UserError(f"--device {arg!r}: expected auto, cpu, cuda or cuda:N")
    if arg.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(
            f"--device {arg}: CUDA is not available on this machine (use --device cpu)"
        )
    if arg == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(arg)


def flag(name):
    """argparse destination -> the flag the user typed: batch_size -> --batch-size."""
    return "--" + name.replace("_", "-")


def only_category(category, categories, where):
    """--category, or the only category of `where` (a data set, a checkpoint) when not given."""
    if category is not None:
        return category
    if len(categories) != 1:
        raise UserError(
            f"--category is needed: {where} has {len(categories)} categories: "
            f"{', '.join(categories)}"
        )
    return categories[0]


def require_positive(**values):
    """Each named value must be >= 1: require_positive(steps=args.steps, ...)."""
    for name, value in values.items():
        if value < 1:
            raise UserError(f"{flag(name)} must be >= 1 (got {value})")


def require_non_negative(**values):
    """Each named value must be >= 0: require_non_negative(workers=args.workers)."""
    for name, value in values.items():
        if value is not None and value < 0:
            raise UserError(f"{flag(name)} must be >= 0 (got {value})")


def require_finite_positive(**values):
    """Each named value must be a finite number > 0: require_finite_positive(lr=args.lr)."""
    for name, value in values.items():
        if not math.isfinite(value) or value <= 0:
            raise UserError(f"{flag(name)} must be a finite number > 0 (got {value})")


def refuse_ignored(args, name, default, needs, why):
    """A flag that only matters together with another one (`needs`) is refused when given
    alone, instead of being silently ignored: refuse_ignored(args, "threshold", None,
    "predict", "it draws the contour of its pictures")."""
    value = getattr(args, name)
    if value != default and getattr(args, needs) in (None, False):
        raise UserError(f"{flag(name)} {value} has no effect without {flag(needs)} ({why})")


# ----------------------------------------------------------------------------------------
# Flags shared by several stages
# ----------------------------------------------------------------------------------------


def add_data_args(
    parser,
    default="data/demo",
    required=False,
    help="data set root (the embedded demo by default)",
):
    parser.add_argument("--data", default=default, required=required, help=help)
    parser.add_argument(
        "--format",
        default="auto",
        help="layout: auto | mvtec | mpdd | btad | visa | visa_csv | folder",
    )


def add_anomaly_source_args(parser, from_afs=False):
    """--sdas, --dtd, --foreground, --min-paste-contrast: where synthetic anomalies come from,
    where they go and how visible they must be (`anomaly_settings` passes them on).
    from_afs: the defaults are those the AFS file records (train_realnet.py)."""
    from .masks import FOREGROUND_MODES  # here, not at the top: masks.py imports this module

    note = "; None: the AFS file's" if from_afs else ""
    parser.add_argument(
        "--sdas", default=None, help="folder of SDAS images (synthesize.py)" + note
    )
    parser.add_argument(
        "--dtd",
        default=None,
        help="DTD folder (images/<texture>/*); with --sdas: half each" + note,
    )
    parser.add_argument(
        "--foreground",
        default=None if from_afs else "category",
        choices=FOREGROUND_MODES,
        help="where anomalies may go: the authors' rule per category, auto (Otsu) or none" + note,
    )
    parser.add_argument(
        "--min-paste-contrast",
        type=float,
        default=None if from_afs else 0.0,
        help="beyond the paper (0: off): redraw a synthetic anomaly's appearance while the "
        "paste changes the image less than this, in units of the image's local spread "
        "(realnet/anomalies.py paste_contrast)" + note,
    )


def anomaly_settings(args, **override):
    """The flags of `add_anomaly_source_args` as anomalies.synthesizers_for's keywords."""
    return {
        "sdas_dir": args.sdas,
        "dtd_dir": args.dtd,
        "foreground": args.foreground,
        "min_contrast": args.min_paste_contrast,
    } | override


def add_device_arg(parser):
    parser.add_argument(
        "--device", default="auto", help="auto (CUDA if available) | cpu | cuda | cuda:N"
    )


def add_workers_arg(parser, default=2):
    """--workers; default None: 4 with CUDA, 0 on a CPU (the stage decides)."""
    why = "" if default is not None else "; default: 4 with CUDA, 0 on a CPU (they would compete)"
    parser.add_argument(
        "--workers",
        type=int,
        default=default,
        help="data loader processes (0 = in-process; capped to the CPU cores "
        "and the batches)" + why,
    )


def worker_error_line(message):
    """The original message of an error that torch re-raised from a DataLoader worker
    ("Caught UserError in DataLoader worker process 1. Original Traceback ... UserError:
    <message>"), or `message` itself when it is not such a wrapper."""
    text = str(message)
    if not text.startswith("Caught ") or "Original Traceback" not in text:
        return text
    marker = UserError.__name__ + ": "
    last = [line for line in text.splitlines() if marker in line]
    return last[-1].split(marker, 1)[1] if last else text.splitlines()[0]


def run(main):
    """Call `main()`; print a `UserError` as one line and exit 2 instead of a traceback (one
    raised in a DataLoader worker too: torch re-raises it with the worker's traceback in its
    message, `worker_error_line` takes the original line back out)."""
    try:
        main()
    except UserError as e:
        print(f"error: {worker_error_line(e)}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


def require_dir(path, what):
    """The folder `path` must exist; `what` says what it should hold (used in the error),
    and the error says what is there instead (a file) when something is."""
    if not os.path.isdir(path):
        if os.path.exists(path):
            raise UserError(f"{what}: {path!r} is a file, expected a folder")
        raise UserError(f"{what}: folder {path!r} does not exist")
    return path


def require_file(path, what):
    """The file `path` must exist (the error says when it is a folder)."""
    if not os.path.isfile(path):
        if os.path.isdir(path):
            raise UserError(f"{what}: {path!r} is a folder, expected a file")
        raise UserError(f"{what}: file {path!r} does not exist")
    return path


def args_to_dict(args):
    """argparse.Namespace -> JSON-friendly dict (what each stage saves beside its outputs)."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in sorted(vars(args).items())}


def seed_everything(seed):
    """Seed python, numpy and torch. Determinism of the CPU path is what tests rely on."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def parse_list(text, cast=str):
    """'a,b,c' -> ['a', 'b', 'c'] (how --categories and friends are given)."""
    return [cast(t) for t in text.split(",") if t.strip()]
