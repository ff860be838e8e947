"""The pictures evaluate.py writes per test image: image | ground truth | anomaly map with
the contour of the pixel threshold (panels/<category>/<defect>_<name>.png).

The contour is the calibrated pixel threshold (chosen without labels); a checkpoint without
a calibration gets the F1-optimal threshold of the test set instead, for the pictures only,
and each picture says which.
"""

import os

from . import data, metrics, viz
from .files import atomic_save_image


def picture_threshold(calibrated, maps, masks, labels, has_masks):
    """The contour of the pictures: the calibrated pixel threshold (no labels), else the
    F1-optimal one of the test set, for the pictures only."""
    if calibrated and calibrated.get("pixel") is not None:
        how = calibrated.get("rule") if calibrated.get("set_by") == "calibration" else "by hand"
        return {
            "value": calibrated["pixel"],
            "pixel_f1": None,
            "chosen_on": f"calibration ({calibrated['used_from']}), rule {how}",
            "note": f"contour: map >= {calibrated['pixel']:.3f}, calibrated ({how}, no "
            "test labels)",
        }
    value, f1 = (None, None)
    if labels.any() and has_masks.all():
        value, f1 = metrics.f1_optimal_threshold(maps, masks)
    note = (
        f"contour: map >= {value:.3f}, F1-optimal on the test set, for pictures only (no "
        "calibration)"
        if value is not None
        else "no contour: no calibration, no test masks"
    )
    return {
        "value": value,
        "pixel_f1": f1,
        "note": note,
        "chosen_on": "the test set, FOR THE PICTURES ONLY (no metric uses it; the checkpoint "
        "is not calibrated)",
    }


def write_panels(samples, maps, masks, scores, threshold, note, size, folder, limit, probability):
    """Up to `limit` panels (-1: all), taking the defect types (and good) in turn."""
    by_defect = {}
    for i, s in enumerate(samples):
        by_defect.setdefault(s.defect, []).append(i)
    interleaved = []
    for rank in range(max(len(group) for group in by_defect.values())):
        interleaved += [group[rank] for group in by_defect.values() if rank < len(group)]
    chosen = interleaved if limit < 0 else interleaved[:limit]
    for i in chosen:
        s = samples[i]
        image = data.load_image(s.image, size)
        row = viz.hstack(
            [
                viz.labelled(image, "image"),
                viz.labelled(viz.mask_to_uint8(masks[i]), "ground truth"),
                viz.labelled(
                    viz.heat_panel(image, maps[i], threshold, probability),
                    f"score {scores[i]:.3f}",
                ),
            ]
        )
        row = viz.labelled(row, f"{s.defect} {os.path.basename(s.image)} | {note}")
        name = f"{s.defect}_{os.path.splitext(os.path.basename(s.image))[0]}.png"
        atomic_save_image(viz.to_pil(row), os.path.join(folder, name))
