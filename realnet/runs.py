"""Run state: what a stage saves so that it can be continued, and the checks that keep a
continued run honest. Every stage uses these, so "the saved settings must match" means
the same thing, and says what differs, everywhere.

    args.json        the arguments a stage ran with (`save_args`)
    state.pt         everything a training stage needs to continue (`load_state`)
    loss.jsonl       one JSON line per logged step (`trim_log`, `read_log`)

A state also carries the RNG states (`rng_state` / `restore_rng`). A file made from a data
set with a frozen backbone records both; the next stage reopens them
(`open_recorded_dataset`, `load_recorded_backbone`) unless told otherwise.
"""

import json
import os
import random

import numpy as np
import torch

from .cli import UserError, args_to_dict
from .files import atomic_write_json, atomic_write_text, load_checkpoint
from .files import prepare_output_folder

STATE_FILE = "state.pt"
LOG_FILE = "loss.jsonl"


def save_args(args, folder, name="args.json"):
    """The stage's arguments, as JSON, beside its outputs."""
    atomic_write_json(os.path.join(folder, name), args_to_dict(args))


def start_outputs(out, args, step):
    """A training stage's output folder at `step`: created, args.json written, every
    step-indexed log (*.jsonl: the loss log, validation logs) trimmed to `step`. Returns the
    loss log's path (the main process only calls this)."""
    prepare_output_folder(out, clean=False)
    save_args(args, out)
    for name in sorted(os.listdir(out)):
        if name.endswith(".jsonl"):
            trim_log(os.path.join(out, name), step)
    return os.path.join(out, LOG_FILE)


# ----------------------------------------------------------------------------------------
# Same settings
# ----------------------------------------------------------------------------------------


def _short(value, limit=60):
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def differences(before, now, prefix=""):
    """'key: X there, Y now' for every entry of two settings dicts that differs; nested
    dicts are compared entry by entry (keys joined with a dot)."""
    found = []
    for key in sorted(set(before) | set(now), key=str):
        a, b = before.get(key), now.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            found += differences(a, b, f"{prefix}{key}.")
        elif a != b:  # a flag ("--lr") is named as the user types it, without its group
            name = key if str(key).startswith("--") else f"{prefix}{key}"
            found.append(f"{name}: {_short(a)} there, {_short(b)} now")
    return found


def require_same_settings(before, now, problem, remedy):
    """Raise `UserError("<problem> (<what differs>); <remedy>")` when the settings differ."""
    changed = differences(before, now)
    if changed:
        raise UserError(f"{problem} ({'; '.join(changed)}); {remedy}")


def load_state(out, resume, kind, log=print):
    """The training state to continue from OUT/state.pt, or None for a fresh start.
    Without --resume an existing state is never overwritten silently."""
    path = os.path.join(out, STATE_FILE)
    if resume and os.path.isfile(path):
        return load_checkpoint(path, "--resume", kind=kind)
    if resume:
        log(f"--resume: no {path} yet, starting from step 0")
    elif os.path.exists(path):
        raise UserError(
            f"{out!r} already holds a training run ({path}); pass --resume to "
            "continue it or choose another --out"
        )
    return None


# ----------------------------------------------------------------------------------------
# Random number generators
# ----------------------------------------------------------------------------------------


def rng_state():
    """Every global generator a stage draws from: torch (and CUDA), numpy, python; as
    tensors and plain lists, so that a state loads with weights_only=True."""
    bit_generator, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "bit_generator": bit_generator,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "python": [version, list(internal), gauss_next],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state):
    torch.set_rng_state(state["torch"].cpu())
    saved = state["numpy"]
    np.random.set_state(
        (
            saved["bit_generator"],
            saved["keys"].numpy().astype(np.uint32),
            saved["pos"],
            saved["has_gauss"],
            saved["cached_gaussian"],
        )
    )
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


# ----------------------------------------------------------------------------------------
# Training state on the model's device
# ----------------------------------------------------------------------------------------


def restore_training(model, optimizer, state, model_key="model", optimizer_key="optimizer"):
    """Load a saved model and optimiser state into `model` and its optimiser, both made on
    the model's device (move the model first, then make the optimiser). A state is read onto
    the CPU; load_state_dict copies the weights onto the model's device and the optimiser's
    moments follow each parameter's device: restored before the move, Adam would keep CPU
    moments for CUDA weights."""
    model.load_state_dict(state[model_key])
    optimizer.load_state_dict(state[optimizer_key])
    misplaced = misplaced_tensors(model, optimizer)
    if misplaced:  # a bug, not a user error: say which tensor
        raise RuntimeError(f"restored optimiser state off its parameter's device: {misplaced[0]}")


def misplaced_tensors(model, optimizer):
    """'name: on X, parameter on Y' for every optimiser state tensor (Adam's moments) that
    is not on its parameter's device; the scalar step counters live on the CPU by design."""
    names = {id(p): n for n, p in model.named_parameters()}
    found = [
        f"an optimised tensor on {p.device} is not a parameter of the model (the model was "
        "moved to its device after the optimiser was made)"
        for group in optimizer.param_groups
        for p in group["params"]
        if id(p) not in names
    ]
    for param, entry in optimizer.state.items():
        for key, value in entry.items():
            if torch.is_tensor(value) and value.dim() > 0 and value.device != param.device:
                found.append(
                    f"{names.get(id(param), '?')} {key}: on {value.device}, "
                    f"parameter on {param.device}"
                )
    return found


# ----------------------------------------------------------------------------------------
# Loss logs
# ----------------------------------------------------------------------------------------


def read_log(path, last_step=None):
    """The entries of a JSON-lines log (up to last_step); a line cut by a kill is skipped."""
    if not os.path.isfile(path):
        return []
    entries = []
    with open(path) as f:
        for line in f:
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if last_step is None or entry.get("step", 0) <= last_step:
                entries.append(entry)
    return entries


def trim_log(path, last_step):
    """Keep the entries up to last_step: a resumed run rewrites what came after its state."""
    kept = read_log(path, last_step)
    atomic_write_text(path, "".join(json.dumps(e, sort_keys=True) + "\n" for e in kept))


def log_line(log_file, entry):
    log_file.write(json.dumps(entry, sort_keys=True) + "\n")
    log_file.flush()


def log_losses(log, progress, step, batch_size, loss, parts, ddp, started):
    """train_realnet.py: the losses averaged over the processes, as a progress line and a
    loss.jsonl entry."""
    import time

    import torch

    from .distributed import all_reduce_mean

    values = torch.stack([loss.detach(), parts["segmentation"], parts["reconstruction"]])
    loss, seg, rec = all_reduce_mean(values, ddp).tolist()
    progress.update(step, items=batch_size, loss=loss, seg=seg, rec=rec)
    log_line(
        log,
        {
            "step": step,
            "loss": loss,
            "segmentation": seg,
            "reconstruction": rec,
            "elapsed_s": round(time.time() - started, 2),
        },
    )
