"""Atomic writes and checked reads.

Every file a stage produces is written to a temporary name in the same folder and then
renamed over the target (`os.replace` is atomic on POSIX), so a stage killed half-way
never leaves a truncated checkpoint or JSON behind, and never destroys the previous one.
A kill during a save can leave the temporary file (.NAME.XXXXXXXX.tmp) behind: the next
start of the stage removes it (`prepare_output_folder`). An output folder is owned by one
run at a time: `prepare_output_folder` locks it until the process ends (`lock_output_folder`).

Checkpoints hold tensors and plain types only (dict, list, tuple, str, int, float, bool,
None) and are read with `torch.load(weights_only=True)`: opening a downloaded model.pt can
then not run code, as unpickling arbitrary objects could.
"""

import csv
import hashlib
import io
import json
import os
import pickle
import re
import tempfile
import zipfile

import torch

from .cli import UserError, require_file


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _umask()


def _atomic_write(path, write_fn, mode="wb"):
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(
        dir=folder, prefix="." + os.path.basename(path) + ".", suffix=".tmp"
    )
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


def atomic_write_csv(path, header, rows):
    """A CSV table (header, then rows) written atomically."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(header)
    writer.writerows(rows)
    atomic_write_bytes(path, buffer.getvalue().encode())


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
                children.clear()  # the folder itself, not the folders in it
    return removed


LOCK_FILE = ".lock"
_held_locks = {}  # real path of a folder -> its open lock file, kept for the process lifetime


def lock_output_folder(path, what="--out"):
    """Own the folder `path` for the rest of this process: an exclusive `flock` on
    PATH/.lock, refused in one line when another running process holds it (two runs into one
    --out would mix their files). The lock file stays open until the process ends: the kernel
    releases the lock then, however the process ends (even kill -9), so a killed run never
    leaves the folder stuck. Several calls of one process for one folder take it once. Under
    torchrun only rank 0 takes it: the ranks of one run share their folder."""
    key = os.path.realpath(path)
    if key in _held_locks or int(os.environ.get("RANK", "0")) != 0:
        return
    import fcntl  # here: POSIX only, and only the stages (not the package's readers) lock

    handle = open(os.path.join(path, LOCK_FILE), "a")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise UserError(
            f"{what} {path!r} is in use by another running process (it holds "
            f"{os.path.join(path, LOCK_FILE)}); wait for it to end or choose "
            f"another {what}"
        )
    except OSError:  # a file system without locks (some network mounts): run unlocked
        pass
    _held_locks[key] = handle


def release_output_folders():
    """Give up every folder this process owns (a process that runs several stages' main()
    one after another, as the tests do; a stage itself keeps its folder until it ends)."""
    while _held_locks:
        _held_locks.popitem()[1].close()


def prepare_output_folder(path, what="--out", clean=True, log=print, files=(), subfolders=()):
    """The output folder of a stage, checked before any long work: it must be a folder (or
    not exist yet: it is created) and writable, and none of the `files` the stage will write
    there may be a folder (say, left by an earlier --out FOLDER/afs.pt). It is then owned by
    this process until it ends (`lock_output_folder`: a second run into it is refused). With
    `clean`, temporary files of an earlier, killed save are removed from it and from the
    stage's `subfolders`. A `UserError` names `what` (the flag) otherwise."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"{what} {path!r} is a file, expected a folder (or a new name)")
    for name in files:
        if os.path.isdir(os.path.join(path, name)):
            raise UserError(
                f"{what} {path!r}: {os.path.join(path, name)!r} is a folder, but "
                f"the stage writes its file {name} there; move it away or choose "
                f"another {what}"
            )
    try:
        os.makedirs(path, exist_ok=True)
        # not named like a temporary: another process cleaning the folder must leave it alone
        fd, probe = tempfile.mkstemp(dir=path, prefix=".write_test.", suffix=".probe")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UserError(
            f"{what} {path!r}: cannot write there ({e.strerror or e}); expected a writable folder"
        )
    lock_output_folder(path, what)
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
        raise TypeError(
            f"{where} is a {type(obj).__name__}: a checkpoint holds tensors and "
            "plain types only (it is read with weights_only=True)"
        )


def atomic_torch_save(obj, path):
    require_plain(obj, os.path.basename(path))
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def atomic_save_image(image, path):
    """Save a PIL image atomically; the format follows the extension."""
    fmt = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG"}.get(
        os.path.splitext(path)[1].lower(), "PNG"
    )
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    atomic_write_bytes(path, buf.getvalue())


def _a(word):
    return ("an " if word[:1].lower() in "aeiou" else "a ") + word


def is_exported_program(path):
    """Whether `path` is a torch.export archive (.pt2, evaluate.py --export): a zip holding
    an archive_format entry, where a checkpoint holds data.pkl."""
    try:
        with zipfile.ZipFile(path) as archive:
            return any(
                name.endswith("/archive_format") or name == "archive_format"
                for name in archive.namelist()
            )
    except (OSError, zipfile.BadZipFile):
        return False


def _unreadable(path, what, e):
    """The one line for a file torch.load cannot read. Not torch's own words: they advise
    weights_only=False, which would switch off the protection against code in the file."""
    if is_exported_program(path):
        return UserError(
            f"{what}: {path!r} is an exported program (torch.export, .pt2), not a "
            "checkpoint: give the model.pt that train_realnet.py wrote"
        )
    if zipfile.is_zipfile(path):
        why = "a zip archive without torch's data.pkl: not written by torch.save"
    else:
        why = (
            "neither torch.save's zip format nor its legacy one: damaged, cut short, or "
            "another kind of file"
        )
    return UserError(
        f"{what}: {path!r} is not a readable torch checkpoint ({why}; {type(e).__name__})"
    )


def safe_torch_load(path, what, map_location="cpu"):
    """torch.load with weights_only=True: tensors and plain types only. A file holding any
    other object is refused with one line (unpickling it could run code)."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL (\S+)", str(e))  # weights_only met an object that is not plain
        if not found:
            raise _unreadable(path, what, e)
        holds = f" ({found.group(1)})"
        raise UserError(
            f"{what}: {path!r} holds Python objects{holds}, not only tensors and "
            "plain types; refused, as loading it could run code (a file written by "
            "an older version of this project: run that stage again)"
        )
    except Exception as e:  # a truncated or foreign file
        raise _unreadable(path, what, e)


def load_checkpoint(path, what, kind=None, map_location="cpu"):
    """torch.load a file this project wrote; a clear error if it is missing or is not ours.

    `kind` is the value of the checkpoint's "kind" entry that the caller expects
    (e.g. "realnet", "diffusion"), so a diffusion checkpoint given to evaluate.py is
    refused with a sentence instead of a KeyError. Read with weights_only=True.
    """
    require_file(path, what)
    ckpt = safe_torch_load(path, what, map_location)
    if kind is not None:
        found = ckpt.get("kind") if isinstance(ckpt, dict) else None
        if found != kind:
            raise UserError(
                f"{what}: {path!r} is {_a(found or 'foreign')} checkpoint, "
                f"expected {_a(kind)} checkpoint"
            )
    return ckpt


def readable_image(path):
    """Whether `path` is a complete image file (an empty or cut PNG is not)."""
    from PIL import Image  # here: only synthesize.py asks

    try:
        with Image.open(path) as image:
            image.verify()  # reads the whole file, checks the PNG chunks' checksums
        return True
    except Exception:  # PIL raises many types for broken files
        return False


def file_digest(path, length=16):
    """Short sha256 of a file: identifies the checkpoint a derived file was made from."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:length]
