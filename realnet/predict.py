"""evaluate.py --predict DIR: score a production lot, one batch at a time, written whole.

A lot is the images directly in DIR. Each lot gets its own folder, by default
<checkpoint folder>/predict/<DIR's name>-<UTC time> (never the evaluation's eval/); an
explicit --out names the lot's folder, which must not exist yet or be empty: a lot is never
written over an earlier one, nor mixed with it. In that folder:

    predictions.csv     one row per scored image: file (its path), score, decision (OK / NG,
                        the OK/NG column; empty without a threshold), threshold (the image
                        threshold), mask, map, picture (paths inside the lot folder)
    skipped.csv         file, reason: every image that could not be read (the lot goes on
                        without it; --stop-on-unreadable stops at the first one instead)
    maps/<file>.npy     the raw anomaly map, float32, at the MODEL's input size (S x S):
                        class 1 of the discriminator's softmax, in [0, 1], or for a model
                        trained with --anomaly-map fused its calibrated units (0: a typical
                        normal pixel, 1: a part's 99th percentile on good pixels)
    masks/<file>.png    the binary defect mask at the IMAGE's own size: 255 where the map,
                        bilinearly resized to that size, is >= the pixel threshold, else 0
                        (only with a pixel threshold)
    pictures/<file>.jpg the image at the model's size beside the map in colour, the contour
                        of the pixel threshold, a caption with the score and the decision
    calibration.json    the calibration used: its thresholds (by hand or fitted, and how),
                        the fused map's scale, the weights it belongs to (editable;
                        evaluate.py --calibration reads it back; only with a threshold)
    throughput.json     only with --throughput: images/s of the forward pass alone
    lot.json            what was scored, with what (checkpoint, threshold source, flags),
                        counts (scored, OK, NG, skipped), times and images/s; written last

<file> is the image's whole file name (a.png -> maps/a.png.npy), so two images of one
folder never share an output (a.png and a_png.png stay apart); a name too long for the file
system is cut and given a hash of the whole name (`output_names`).

Why maps stay at the model's size: that is where the model computes them, and a map of a
20-megapixel image at its own size would be 80 MB; the mask, the decision a user acts on,
is at the image's size.

How a lot is written. Everything goes into <lot>.partial/ as it is made (per batch: score,
map, mask, picture, CSV rows), so memory is bounded by the batch, not by the lot. At the end
the staging folder is renamed to <lot> in one step (rename is atomic): a lot that exists is
complete; an interrupted one leaves only <lot>.partial/ (removed on the way out when the
run can, else by the next run into that folder, which says so). A lock file
(.<lot>.lock, fcntl.flock) is held for the whole run: a second run into the same lot is
refused at once, and the kernel releases the lock of a killed run.

Decision: NG when the image score (evaluate.py's, --image-score) is >= the image threshold.
The mask is the pixel threshold applied to the map as it is, whatever the decision: an OK
image can show a small region, which says where it came closest.
"""

import csv
import datetime
import fcntl
import hashlib
import io
import json
import os
import shutil
import time

import numpy as np
import torch
from PIL import Image

from . import data, metrics, viz
from .cli import UserError, args_to_dict, require_dir
from .loaders import start_loader
from .progress import Progress
from .throughput import measure as measure_throughput

CSV_COLUMNS = ["file", "score", "decision", "threshold", "mask", "map", "picture"]
SKIPPED_COLUMNS = ["file", "reason"]
NAME_MAX = 255  # bytes in one file name (Linux, macOS, Windows)


# ----------------------------------------------------------------------------------------
# Names
# ----------------------------------------------------------------------------------------


def output_name(file_name, longest_suffix=".png", limit=NAME_MAX):
    """The image's whole file name, or where that plus `longest_suffix` would not fit in a
    file name, its start, '~' and 12 hex digits of the sha256 of the whole name."""
    encoded = file_name.encode("utf-8", "surrogateescape")
    room = limit - len(longest_suffix.encode())
    if len(encoded) <= room:
        return file_name
    digest = hashlib.sha256(encoded).hexdigest()[:12]
    start = encoded[: room - 13].decode("utf-8", "ignore")  # never half a character
    return f"{start}~{digest}"


def output_names(paths):
    """One output name per image, distinct for distinct file names of one folder."""
    names = [output_name(os.path.basename(p)) for p in paths]
    if len(set(names)) != len(names):  # only a name made to look like a shortened one
        raise UserError(
            "--predict: two images map to the same output name "
            f"({len(names) - len(set(names))} clash); rename them"
        )
    return names


# ----------------------------------------------------------------------------------------
# Reading a lot: a bad file is a row of the result, not an exception
# ----------------------------------------------------------------------------------------


class LotImages(torch.utils.data.Dataset):
    """The images of a lot at the model's input size. An image that cannot be read comes
    back as a marker (error: the reason) instead of raising: an exception in a loader
    worker would end the whole lot, and with --workers > 0 reach the user as a worker
    traceback instead of the file's name."""

    def __init__(self, paths, size):
        self.paths, self.size = paths, size

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        path = self.paths[i]
        try:
            width, height = data.image_size_of(path)
            picture = data.load_image(path, self.size)
        except UserError as e:
            return self.marker(i, str(e))
        except Exception as e:  # a reader that fails in a way data.py does not name
            return self.marker(
                i,
                f"image {path!r} is not a readable image ({type(e).__name__}: {e})".splitlines()[
                    0
                ],
            )
        return {
            "image": data.to_tensor(picture),
            "picture": torch.from_numpy(picture),
            "width": width,
            "height": height,
            "index": i,
            "error": "",
        }

    def marker(self, i, reason):
        s = self.size
        return {
            "image": torch.zeros(3, s, s),
            "picture": torch.zeros(s, s, 3, dtype=torch.uint8),
            "width": 0,
            "height": 0,
            "index": i,
            "error": reason,
        }


def list_lot(folder):
    """The image paths of --predict DIR, sorted; one line if there are none."""
    paths = data.list_images(require_dir(folder, "--predict"))
    if not paths:
        raise UserError(
            f"--predict: folder {folder!r} has no images ({', '.join(data.IMAGE_EXTENSIONS)})"
        )
    return paths


# ----------------------------------------------------------------------------------------
# The lot's folder: staged, locked, committed whole
# ----------------------------------------------------------------------------------------


def _try_lock(path):
    """An open descriptor holding an exclusive flock on `path` (created if needed), or
    None when another process holds it. The inode check covers a holder that removed the
    lock file between our open and our flock: we would hold a lock on a deleted file."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            return fd
        os.close(fd)


def _holder(path):
    try:
        with open(path) as f:
            return f"pid {f.read().strip() or '?'}"
    except OSError:
        return "another process"


class Lot:
    """The folder of one lot: <final>.partial/ while it is written, <final>/ once whole."""

    def __init__(self, final):
        self.final = os.path.abspath(final)
        parent, name = os.path.split(self.final)
        self.parent, self.name = parent, name
        self.staging = self.final + ".partial"
        self.lock_path = os.path.join(parent, f".{name}.lock")
        self.fd = None

    def claim(self, log=print):
        """Lock the lot and start its staging folder. Returns False when another run holds
        it or it holds a finished lot; a stale staging folder (a killed run) is removed."""
        os.makedirs(self.parent, exist_ok=True)
        self.fd = _try_lock(self.lock_path)
        if self.fd is None:
            return False
        if os.path.exists(self.final) and not (
            os.path.isdir(self.final) and not os.listdir(self.final)
        ):
            self.release()
            return False
        if os.path.exists(self.staging):
            shutil.rmtree(self.staging)
            log(f"removed {self.staging}: the unfinished lot of an interrupted run")
        os.makedirs(self.staging)
        return True

    def why_not(self):
        """Why `claim` failed, in words (for an explicit --out)."""
        if os.path.isfile(self.final):
            return "is a file, expected a new folder for the lot"
        if os.path.isfile(os.path.join(self.final, "lot.json")):
            return (
                "holds a finished lot; a lot is never written over another: choose a new "
                "--out (or leave it out: each lot gets its own folder) or remove it"
            )
        if os.path.exists(self.final):
            return "is not empty; a lot is written to a new or empty folder only"
        return (
            f"another predict run ({_holder(self.lock_path)}) is writing this lot; wait "
            "for it or choose another --out"
        )

    def path(self, *parts):
        return os.path.join(self.staging, *parts)

    def commit(self):
        """Make the lot visible, whole: flush it to disk, then one rename."""
        os.sync()  # the files' data reach the disk before the name that says "finished"
        if os.path.isdir(self.final):
            os.rmdir(self.final)  # an empty folder given as --out
        os.rename(self.staging, self.final)
        self.release()

    def abandon(self):
        """An interrupted run: remove what it staged (nothing finished is touched)."""
        shutil.rmtree(self.staging, ignore_errors=True)
        self.release()

    def release(self):
        if self.fd is not None:
            os.unlink(self.lock_path)  # while holding it: see _try_lock's inode check
            os.close(self.fd)
            self.fd = None


def remove_stale_lots(parent, log=print):
    """Remove the staging folders that killed runs left in `parent` (their lock is free)."""
    if not os.path.isdir(parent):
        return
    for name in sorted(os.listdir(parent)):
        if name.endswith(".partial") and os.path.isdir(os.path.join(parent, name)):
            stale = Lot(os.path.join(parent, name[: -len(".partial")]))
            stale.fd = _try_lock(stale.lock_path)
            if stale.fd is not None:  # nobody writes it: a killed run's
                shutil.rmtree(stale.staging, ignore_errors=True)
                log(f"removed {stale.staging}: the unfinished lot of an interrupted run")
                stale.release()


def claim_lot(out, checkpoint, images_folder, log=print):
    """The Lot this run writes, claimed. `out` None: a new folder under
    <checkpoint folder>/predict/ named after the images' folder and the time."""
    try:
        if out is not None:
            lot = Lot(out)
            if not lot.claim(log):
                raise UserError(f"--out {out!r} {lot.why_not()}")
            return lot
        parent = os.path.join(os.path.dirname(os.path.abspath(checkpoint)), "predict")
        remove_stale_lots(parent, log)
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
        base = f"{os.path.basename(os.path.abspath(images_folder))}-{stamp}"
        for attempt in range(1, 100):
            lot = Lot(os.path.join(parent, base if attempt == 1 else f"{base}-{attempt}"))
            if lot.claim(log):
                return lot
        raise UserError(f"no free lot folder in {parent!r} (99 taken for {base}); use --out")
    except OSError as e:
        where = out if out is not None else os.path.dirname(os.path.abspath(checkpoint))
        raise UserError(f"--out {where!r}: cannot write the lot there ({e.strerror or e})")


# ----------------------------------------------------------------------------------------
# One image's outputs
# ----------------------------------------------------------------------------------------


def decide(score, image_threshold):
    """'NG' when score >= the image threshold, 'OK' below it, '' without a threshold."""
    if image_threshold is None:
        return ""
    return "NG" if np.float32(score) >= np.float32(image_threshold) else "OK"


def binary_mask(anomaly_map, pixel_threshold, size):
    """(height, width) uint8 0/255: the map resized (bilinear) to size = (width, height),
    then thresholded."""
    resized = Image.fromarray(np.asarray(anomaly_map, dtype=np.float32), mode="F")
    if resized.size != tuple(size):
        resized = resized.resize(tuple(size), Image.BILINEAR)
    return np.where(np.asarray(resized) >= np.float32(pixel_threshold), 255, 0).astype(np.uint8)


def npy_bytes(array):
    buffer = io.BytesIO()
    np.save(buffer, np.asarray(array, dtype=np.float32))
    return buffer.getvalue()


def png_bytes(array, mode=None):
    buffer = io.BytesIO()
    # level 1: much faster than the default level, files a few % larger
    Image.fromarray(array, mode).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def write_file(path, payload):
    # Plain writes: the lot becomes visible only by the rename of its whole folder, so a
    # file cut short by a kill is never seen in a finished lot
    with open(path, "wb") as f:
        f.write(payload)


def jpeg_bytes(array):
    buffer = io.BytesIO()
    # JPEG: a picture is for a person (the map and the mask are the data); it takes a tenth
    # of the time of a PNG, which at the demo's scale is a tenth of the time of scoring
    Image.fromarray(array).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def picture(image, anomaly_map, score, verdict, path, threshold, probability):
    """The image beside the map in colour with the contour; one caption line."""
    pixel = threshold and threshold.get("pixel")
    note = f"contour: map >= {pixel:.4f}" if pixel is not None else "no threshold"
    row = viz.hstack([image, viz.heat_panel(image, anomaly_map, pixel, probability)])
    caption = f"{os.path.basename(path)} | score {score:.3f}{' ' + verdict if verdict else ''}"
    return viz.labelled(row, f"{caption} | {note}")


def write_image_outputs(lot, path, name, image, size, anomaly_map, score, threshold, probability):
    """The map, the mask (with a pixel threshold) and the picture of one image in the
    staging folder; returns its CSV row."""
    image_threshold = threshold and threshold.get("image")
    pixel_threshold = threshold and threshold.get("pixel")
    verdict = decide(score, image_threshold)
    map_path = os.path.join("maps", name + ".npy")
    write_file(lot.path(map_path), npy_bytes(anomaly_map))
    mask_path = ""
    if pixel_threshold is not None:
        mask_path = os.path.join("masks", name + ".png")
        write_file(
            lot.path(mask_path), png_bytes(binary_mask(anomaly_map, pixel_threshold, size), "L")
        )
    picture_path = os.path.join("pictures", name + ".jpg")
    write_file(
        lot.path(picture_path),
        jpeg_bytes(picture(image, anomaly_map, score, verdict, path, threshold, probability)),
    )
    # 9 significant digits: a float32 read back exactly, so the CSV shows what was compared
    return [
        path,
        f"{float(score):.9g}",
        verdict,
        "" if image_threshold is None else f"{image_threshold:.9g}",
        mask_path,
        map_path,
        picture_path,
    ]


# ----------------------------------------------------------------------------------------
# The lot
# ----------------------------------------------------------------------------------------


@torch.no_grad()
def score_batch(model, features, images, image_score, pool):
    """Images (B, 3, S, S) -> (maps (B, S, S) float32 on the CPU, image scores (B,))."""
    maps = model(features(images), images.shape[-2:])["anomaly_map"].float().cpu()
    return maps, metrics.image_scores(maps.numpy(), pool="max" if image_score == "max" else pool)


def predict_lot(
    model,
    features,
    images_folder,
    device,
    threshold,
    *,
    out=None,
    checkpoint,
    image_score="avgpool",
    pool=16,
    batch_size=16,
    workers=2,
    stop_on_unreadable=False,
    calibration_record=None,
    settings=None,
    throughput=None,
    log=print,
):
    """Score every image of `images_folder` into a lot folder of its own (see the module's
    doc); returns the lot's path. `threshold` is realnet.threshold.resolve's (or None);
    `calibration_record` what calibration.json holds; `settings` the flags, for lot.json;
    `throughput(images)`, if given, measures the forward pass on the first batch."""
    paths = list_lot(images_folder)
    names = output_names(paths)
    if threshold is None:
        log(
            "note: no threshold: the checkpoint is not calibrated (train with --val-fraction "
            "> 0, or python3 -m realnet.calibration) and no --calibration, --image-threshold "
            "or --pixel-threshold was given: scores and maps only, no OK/NG, no masks"
        )
    lot = claim_lot(out, checkpoint, images_folder, log)
    try:
        summary = write_lot(
            lot,
            model,
            features,
            paths,
            names,
            device,
            threshold,
            image_score,
            pool,
            batch_size,
            workers,
            stop_on_unreadable,
            calibration_record,
            throughput,
            log,
        )
        summary.update(
            {
                "images_folder": os.path.abspath(images_folder),
                "checkpoint": os.path.abspath(checkpoint),
                "settings": settings or {},
            }
        )
        write_file(
            lot.path("lot.json"), (json.dumps(summary, indent=2, sort_keys=True) + "\n").encode()
        )
        lot.commit()
    except BaseException:
        lot.abandon()
        raise
    counts = summary["counts"]
    decided = f"{counts['NG']} NG, {counts['OK']} OK; " if calibration_record else ""
    skipped = (
        f"; skipped {counts['skipped']} unreadable (listed in skipped.csv)"
        if counts["skipped"]
        else ""
    )
    log(
        f"scored {counts['scored']} images ({decided}{summary['images_per_s']} images/s"
        f"{skipped}): lot {lot.final}"
    )
    return lot.final


def predict_folder(args, model, features, calibrated, device):
    """evaluate.py --predict DIR: score, decide and map every image of a folder (no labels),
    as one lot, with evaluate.py's flags `args` and calibration (calibration.for_run)."""
    record = calibrated and calibrated | {"checkpoint": os.path.abspath(args.checkpoint)}
    timing = (
        (lambda images: measure_throughput(model, features, images, args.throughput_repeats))
        if args.throughput
        else None
    )
    predict_lot(
        model,
        features,
        args.predict,
        device,
        calibrated,
        out=args.out,
        checkpoint=args.checkpoint,
        image_score=args.image_score,
        pool=args.pool,
        batch_size=args.batch_size,
        workers=args.workers,
        stop_on_unreadable=args.stop_on_unreadable,
        calibration_record=record,
        settings=args_to_dict(args),
        throughput=timing,
    )


def write_lot(
    lot,
    model,
    features,
    paths,
    names,
    device,
    threshold,
    image_score,
    pool,
    batch_size,
    workers,
    stop_on_unreadable,
    calibration_record,
    throughput,
    log,
):
    size = model.config["input_size"]
    for folder in ("maps", "pictures") + (
        ("masks",) if threshold and threshold.get("pixel") is not None else ()
    ):
        os.makedirs(lot.path(folder))
    loader = start_loader(LotImages(paths, size), workers, log=log, batch_size=batch_size)
    progress = Progress(len(loader), "predict", unit="img", every=max(1, len(loader) // 20))
    counts = {"scored": 0, "OK": 0, "NG": 0, "skipped": 0}
    first_batch = None
    started = time.time()
    with (
        open(lot.path("predictions.csv"), "w", newline="") as table,
        open(lot.path("skipped.csv"), "w", newline="") as skipped_table,
    ):
        rows, skipped_rows = csv.writer(table), csv.writer(skipped_table)
        rows.writerow(CSV_COLUMNS)
        skipped_rows.writerow(SKIPPED_COLUMNS)
        for step, batch in enumerate(loader, start=1):
            good = [k for k, error in enumerate(batch["error"]) if not error]
            for k, error in enumerate(batch["error"]):
                if error:
                    if stop_on_unreadable:
                        raise UserError(
                            f"--predict: {error} (--stop-on-unreadable: lot "
                            "stopped, nothing written)"
                        )
                    skipped_rows.writerow([paths[int(batch["index"][k])], error])
                    counts["skipped"] += 1
            if good:
                images = batch["image"][good].to(device)
                if throughput is not None and first_batch is None:
                    first_batch = images  # measured after the lot, not inside its time
                maps, scores = score_batch(model, features, images, image_score, pool)
                for j, k in enumerate(good):
                    i = int(batch["index"][k])
                    size_i = (int(batch["width"][k]), int(batch["height"][k]))
                    row = write_image_outputs(
                        lot,
                        paths[i],
                        names[i],
                        batch["picture"][k].numpy(),
                        size_i,
                        maps[j].numpy(),
                        scores[j],
                        threshold,
                        not model.fused,
                    )
                    rows.writerow(row)
                    counts["scored"] += 1
                    if row[2]:
                        counts[row[2]] += 1
            table.flush()
            skipped_table.flush()
            progress.update(
                step,
                items=len(good),
                images=f"{counts['scored'] + counts['skipped']}/{len(paths)}",
            )
    seconds = time.time() - started
    speed = throughput(first_batch) if first_batch is not None else None
    if counts["skipped"]:
        log(
            f"skipped {counts['skipped']} of {len(paths)} images that could not be read: "
            f"{lot.final}/skipped.csv lists them with the reason"
        )
    if calibration_record is not None:
        write_file(
            lot.path("calibration.json"),
            (json.dumps(calibration_record, indent=2, sort_keys=True) + "\n").encode(),
        )
    if speed is not None:
        write_file(
            lot.path("throughput.json"),
            (json.dumps(speed, indent=2, sort_keys=True) + "\n").encode(),
        )
    image_threshold = threshold and threshold.get("image")
    return {
        "kind": "realnet_lot",
        "version": 1,
        "counts": counts,
        "images": len(paths),
        "seconds": round(seconds, 3),
        "images_per_s": round(counts["scored"] / max(seconds, 1e-9), 2),
        "finished_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "image_threshold": image_threshold,
        "pixel_threshold": threshold and threshold.get("pixel"),
        "threshold_source": threshold and threshold.get("used_from"),
        "image_score": image_score,
        "pool": pool if image_score == "avgpool" else None,
        "maps": "float32 at the model's input size",
        "masks": "at each image's own size",
    }
