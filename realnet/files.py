"""Atomic writes and checked reads.

Every file a stage produces is written to a temporary name in the same folder and then
renamed over the target (`os.replace` is atomic on POSIX), so a stage killed half-way
never leaves a truncated checkpoint or JSON behind, and never destroys the previous one.
"""
import hashlib
import io
import json
import os
import tempfile

import torch

from .cli import UserError


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _umask()


def _atomic_write(path, write_fn, mode="wb"):
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    try:
        # mkstemp makes the file private (0600); give it the permissions open() would
        os.fchmod(fd, 0o666 & ~_UMASK)
        with os.fdopen(fd, mode) as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path, data):
    _atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path, text):
    _atomic_write(path, lambda f: f.write(text), mode="w")


def atomic_write_json(path, obj):
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def atomic_torch_save(obj, path):
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def atomic_save_image(image, path):
    """Save a PIL image atomically; the format follows the extension."""
    fmt = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG"}.get(os.path.splitext(path)[1].lower(), "PNG")
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    atomic_write_bytes(path, buf.getvalue())


def load_checkpoint(path, what, kind=None):
    """torch.load a file this project wrote; a clear error if it is missing or is not ours.

    `kind` is the value of the checkpoint's "kind" entry that the caller expects
    (e.g. "realnet", "diffusion"), so a diffusion checkpoint given to evaluate.py is
    refused with a sentence instead of a KeyError.
    """
    if not os.path.isfile(path):
        raise UserError(f"{what}: file {path!r} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # a truncated or foreign file
        raise UserError(f"{what}: {path!r} is not a readable torch checkpoint ({type(e).__name__}: {e})".splitlines()[0])
    if kind is not None:
        found = ckpt.get("kind") if isinstance(ckpt, dict) else None
        if found != kind:
            raise UserError(f"{what}: {path!r} is a {found or 'foreign'} checkpoint, expected a {kind} checkpoint")
    return ckpt


def file_digest(path, length=16):
    """Short sha256 of a file: identifies the checkpoint a derived file was made from."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:length]
