"""What every stage script shares at its edges: one-line errors, saved arguments, seeds.

A stage raises `UserError` for anything the user can fix (a missing folder, a checkpoint
made for another configuration, ...). `run(main)` turns it into one line on stderr and
exit code 2, so nobody has to read a traceback to learn that a file is missing.
"""
import json
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
        raise UserError(f"--device {arg}: CUDA is not available on this machine (use --device cpu)")
    if arg == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(arg)


def run(main):
    """Call `main()`; print a `UserError` as one line and exit 2 instead of a traceback."""
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


def require_dir(path, what):
    """The folder `path` must exist; `what` says what it should hold (used in the error)."""
    if not os.path.isdir(path):
        raise UserError(f"{what}: folder {path!r} does not exist")
    return path


def require_file(path, what):
    if not os.path.isfile(path):
        raise UserError(f"{what}: file {path!r} does not exist")
    return path


def args_to_dict(args):
    """argparse.Namespace -> JSON-friendly dict (what each stage saves beside its outputs)."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in sorted(vars(args).items())}


def save_args(args, out_dir, name="args.json"):
    from .files import atomic_write_json
    atomic_write_json(os.path.join(out_dir, name), args_to_dict(args))


def seed_everything(seed):
    """Seed python, numpy and torch. Determinism of the CPU path is what tests rely on."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def parse_list(text, cast=str):
    """'a,b,c' -> ['a', 'b', 'c'] (how --categories and friends are given)."""
    return [cast(t) for t in text.split(",") if t.strip()]


def describe_json(obj):
    return json.dumps(obj, indent=2, sort_keys=True)
