"""Atomic writes and checked reads.

Every file a stage produces is written to a temporary name in the same folder and then
renamed over the target (`os.replace` is atomic on POSIX), so a stage killed half-way
never leaves a truncated checkpoint or JSON behind, and never destroys the previous one.
A kill during a save can leave the temporary file (.NAME.XXXXXXXX.tmp) behind: the next
start of the stage removes it (`prepare_output_folder`).

Checkpoints hold tensors and plain types only (dict, list, tuple, str, int, float, bool,
None) and are read with `torch.load(weights_only=True)`: opening a downloaded model.pt can
then not run code, as unpickling arbitrary objects could.
"""
import hashlib
import io
import json
import os
import pickle
import re
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


# the temporary names _atomic_write makes: "." + target name + "." + mkstemp's 8 characters
_TEMPORARY = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$")


def remove_orphaned_temporaries(folder, subfolders=()):
    """Delete the temporary files that killed saves left in `folder` and in its `subfolders`
    (with theirs; at paper scale a checkpoint's size each). Returns their paths. Only the
    stage's own folders: another stage may be saving in a folder nested in this one. Call
    it where no other process of the stage is saving yet (the main process, at its start)."""
    removed = []
    places = [(folder, False)] + [(os.path.join(folder, name), True) for name in subfolders]
    for place, nested in places:
        for parent, children, names in os.walk(place):
            for name in names:
                if _TEMPORARY.match(name):
                    removed.append(os.path.join(parent, name))
                    os.unlink(removed[-1])
            if not nested:
                children.clear()   # the folder itself, not the folders in it
    return removed


def prepare_output_folder(path, what="--out", clean=True, log=print, files=(), subfolders=()):
    """The output folder of a stage, checked before any long work: it must be a folder (or
    not exist yet: it is created) and writable, and none of the `files` the stage will write
    there may be a folder (say, left by an earlier --out FOLDER/afs.pt). With `clean`,
    temporary files of an earlier, killed save are removed from it and from the stage's
    `subfolders`. A `UserError` names `what` (the flag) otherwise."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"{what} {path!r} is a file, expected a folder (or a new name)")
    for name in files:
        if os.path.isdir(os.path.join(path, name)):
            raise UserError(f"{what} {path!r}: {os.path.join(path, name)!r} is a folder, but "
                            f"the stage writes its file {name} there; move it away or choose "
                            f"another {what}")
    try:
        os.makedirs(path, exist_ok=True)
        # not named like a temporary: another process cleaning the folder must leave it alone
        fd, probe = tempfile.mkstemp(dir=path, prefix=".write_test.", suffix=".probe")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UserError(f"{what} {path!r}: cannot write there ({e.strerror or e}); "
                        "expected a writable folder")
    if clean:
        removed = remove_orphaned_temporaries(path, subfolders)
        if removed:
            log(f"removed {len(removed)} temporary file(s) of an interrupted save in {path}")
    return path


def require_plain(obj, where="checkpoint"):
    """Raise TypeError unless `obj` is made of tensors and plain types only: what
    torch.load(weights_only=True) reads back. Catches a stage that would save, say, a numpy
    array, when it saves instead of when the file is read (a programming error)."""
    # type(), not isinstance(): numpy.float64 is a float subclass that torch.save pickles
    # as a numpy object, which weights_only=True refuses
    if obj is None or type(obj) in (bool, int, float, str) or isinstance(obj, torch.Tensor):
        return
    if isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            require_plain(value, f"{where}[{i}]")
    elif isinstance(obj, dict):
        for key, value in obj.items():
            if not isinstance(key, (str, int)):
                raise TypeError(f"{where}: key {key!r} is not a str or int")
            require_plain(value, f"{where}[{key!r}]")
    else:
        raise TypeError(f"{where} is a {type(obj).__name__}: a checkpoint holds tensors and "
                        "plain types only (it is read with weights_only=True)")


def atomic_torch_save(obj, path):
    require_plain(obj, os.path.basename(path))
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def atomic_save_image(image, path):
    """Save a PIL image atomically; the format follows the extension."""
    fmt = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG"}.get(os.path.splitext(path)[1].lower(), "PNG")
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    atomic_write_bytes(path, buf.getvalue())


def _a(word):
    return ("an " if word[:1].lower() in "aeiou" else "a ") + word


def safe_torch_load(path, what, map_location="cpu"):
    """torch.load with weights_only=True: tensors and plain types only. A file holding any
    other object is refused with one line (unpickling it could run code)."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL (\S+)", str(e))   # weights_only met an object that is not plain
        if not found:
            raise UserError(f"{what}: {path!r} is not a readable torch checkpoint "
                            f"({str(e).splitlines()[0]})")
        holds = f" ({found.group(1)})"
        raise UserError(f"{what}: {path!r} holds Python objects{holds}, not only tensors and "
                        "plain types; refused, as loading it could run code (a file written by "
                        "an older version of this project: run that stage again)")
    except Exception as e:  # a truncated or foreign file
        first = f"{type(e).__name__}: {e}".splitlines()[0]
        raise UserError(f"{what}: {path!r} is not a readable torch checkpoint ({first})")


def load_checkpoint(path, what, kind=None, map_location="cpu"):
    """torch.load a file this project wrote; a clear error if it is missing or is not ours.

    `kind` is the value of the checkpoint's "kind" entry that the caller expects
    (e.g. "realnet", "diffusion"), so a diffusion checkpoint given to evaluate.py is
    refused with a sentence instead of a KeyError. Read with weights_only=True.
    """
    if not os.path.isfile(path):
        raise UserError(f"{what}: file {path!r} does not exist")
    ckpt = safe_torch_load(path, what, map_location)
    if kind is not None:
        found = ckpt.get("kind") if isinstance(ckpt, dict) else None
        if found != kind:
            raise UserError(f"{what}: {path!r} is {_a(found or 'foreign')} checkpoint, "
                            f"expected {_a(kind)} checkpoint")
    return ckpt


def readable_image(path):
    """Whether `path` is a complete image file (an empty or cut PNG is not)."""
    from PIL import Image   # here: only synthesize.py asks
    try:
        with Image.open(path) as image:
            image.verify()   # reads the whole file, checks the PNG chunks' checksums
        return True
    except Exception:   # PIL raises many types for broken files
        return False


def file_digest(path, length=16):
    """Short sha256 of a file: identifies the checkpoint a derived file was made from."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:length]
