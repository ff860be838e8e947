"""Pictures with PIL and numpy only (no matplotlib): heatmaps, panels, contact sheets.

Everything takes and returns uint8 numpy arrays of shape (H, W, 3) or PIL images.
"""

import numpy as np
from PIL import Image, ImageDraw

from .data import IMAGENET_MEAN, IMAGENET_STD


def jet(values):
    """Map values in [0, 1] (any shape) to RGB uint8 with the classic 'jet' colormap."""
    v = np.clip(np.asarray(values, dtype=np.float32), 0.0, 1.0)
    r = np.clip(1.5 - np.abs(4.0 * v - 3.0), 0.0, 1.0)
    g = np.clip(1.5 - np.abs(4.0 * v - 2.0), 0.0, 1.0)
    b = np.clip(1.5 - np.abs(4.0 * v - 1.0), 0.0, 1.0)
    return (np.stack([r, g, b], axis=-1) * 255.0 + 0.5).astype(np.uint8)


def tensor_to_uint8(image, normalization="imagenet"):
    """(3, H, W) tensor -> (H, W, 3) uint8.
    normalization: 'imagenet', 'minus_one_one' or 'unit'."""
    x = image.detach().float().cpu().numpy().transpose(1, 2, 0)
    if normalization == "imagenet":
        x = x * IMAGENET_STD + IMAGENET_MEAN
    elif normalization == "minus_one_one":
        x = (x + 1.0) / 2.0
    return (np.clip(x, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def mask_to_uint8(mask):
    """(H, W) in {0,1} or [0,1] -> (H, W, 3) gray uint8."""
    m = (np.clip(np.asarray(mask, dtype=np.float32), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    return np.repeat(m[..., None], 3, axis=-1)


def overlay(image, heat, alpha=0.5):
    """Blend a jet-coloured heat map (values in [0, 1]) over an RGB uint8 image."""
    colored = jet(heat).astype(np.float32)
    return (alpha * colored + (1 - alpha) * image.astype(np.float32) + 0.5).astype(np.uint8)


def heat_panel(image, anomaly_map, threshold, probability=True):
    """The map in colour over the image, with the threshold's contour. A probability is
    shown as it is (blue 0, red 1); a fused map (calibrated units, unbounded) on 0 to twice
    the threshold, so the contour sits mid-scale (without a threshold: 0 to its maximum)."""
    shown = anomaly_map
    if not probability:
        top = 2 * threshold if threshold is not None else anomaly_map.max()
        shown = anomaly_map / max(float(top), 1e-12)
    panel = overlay(image, shown)
    if threshold is not None:
        panel = draw_contour(panel, anomaly_map >= threshold, color=(255, 0, 0), thickness=2)
    return panel


def boundary(mask):
    """Pixels of a binary mask that touch the outside (4-neighbourhood): its contour."""
    m = np.asarray(mask, dtype=bool)
    p = np.pad(m, 1, mode="constant", constant_values=False)
    interior = p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
    return m & ~interior


def draw_contour(image, mask, color=(255, 0, 0), thickness=1):
    out = image.copy()
    edge = boundary(mask)
    for _ in range(thickness - 1):  # thicken by dilating the edge
        p = np.pad(edge, 1)
        edge = p[1:-1, 1:-1] | p[:-2, 1:-1] | p[2:, 1:-1] | p[1:-1, :-2] | p[1:-1, 2:]
    out[edge] = color
    return out


def labelled(image, text, height=14):
    """Put a caption strip above an image."""
    h, w = image.shape[:2]
    canvas = Image.new("RGB", (w, h + height), (255, 255, 255))
    canvas.paste(Image.fromarray(image), (0, height))
    ImageDraw.Draw(canvas).text((2, 1), text, fill=(0, 0, 0))
    return np.asarray(canvas)


def hstack(images, gap=2):
    h = max(i.shape[0] for i in images)
    padded = [
        np.pad(i, ((0, h - i.shape[0]), (0, gap), (0, 0)), constant_values=255) for i in images
    ]
    return np.concatenate(padded, axis=1)[:, :-gap] if gap else np.concatenate(padded, axis=1)


def titled_rows(rows, normalization="imagenet", min_size=96, gap=2):
    """A sheet of rows of (3, H, W) tensors, each row under its title: rows = [(title, images)].
    Small images are enlarged (nearest) to at least `min_size` px, so they can be judged;
    `gap` white pixels under each row."""
    pictures = []
    for title, images in rows:
        zoom = -(-min_size // images[0].shape[-1])
        tiles = [tensor_to_uint8(x, normalization).repeat(zoom, 0).repeat(zoom, 1) for x in images]
        pictures.append(labelled(hstack(tiles), title))
    padded = [np.pad(p, ((0, gap), (0, 0), (0, 0)), constant_values=255) for p in pictures]
    return np.concatenate(padded, axis=0)


def grid(images, ncols, gap=2):
    """Contact sheet: images (equal sizes) in rows of `ncols`, white gaps."""
    rows = []
    for i in range(0, len(images), ncols):
        row = list(images[i : i + ncols])
        row += [np.full_like(images[0], 255)] * (ncols - len(row))
        rows.append(hstack(row, gap))
    out = []
    for r in rows:
        out.append(r)
        out.append(np.full((gap, r.shape[1], 3), 255, dtype=np.uint8))
    return np.concatenate(out[:-1], axis=0)


def to_pil(array):
    return Image.fromarray(np.asarray(array, dtype=np.uint8))


def contact_sheet(paths, captions, columns=8, min_size=96):
    """The image files in a grid, each captioned (small images are enlarged, nearest-neighbour,
    to at least `min_size` px so they and their captions are legible)."""
    tiles = []
    for path, caption in zip(paths, captions):
        with Image.open(path) as im:
            zoom = -(-min_size // im.width)
            size = (im.width * zoom, im.height * zoom)
            image = np.asarray(im.convert("RGB").resize(size, Image.NEAREST))
        tiles.append(labelled(image, caption, height=12))
    return grid(tiles, min(columns, len(tiles)))


# ----------------------------------------------------------------------------------------
# AFS's per-channel losses (select_features.py's afs_scores.png)
# ----------------------------------------------------------------------------------------


def draw_afs_scores(scores, indices, layers, width=1024, height=150):
    """One panel per layer: each channel's summed loss (x: channel, y: loss, low = bottom);
    kept channels red, dropped grey, the cut as a blue line."""
    panels = []
    for layer, score, kept in zip(layers, scores, indices):
        s = score.numpy()
        low, high = float(s.min()), float(s.max())
        canvas = Image.new("RGB", (width, height + 20), (255, 255, 255))
        draw = ImageDraw.Draw(canvas)
        keep = np.zeros(len(s), bool)
        keep[kept.numpy()] = True
        cut = float(s[keep].max())
        draw.text(
            (4, 3),
            f"layer{layer}: kept {keep.sum()} of {len(s)} channels (loss <= {cut:.4g}); "
            f"loss {low:.4g} .. {high:.4g}",
            fill=(0, 0, 0),
        )
        y = lambda v: 20 + (height - 4) - int((v - low) / (high - low + 1e-12) * (height - 8))
        draw.line([(0, y(cut)), (width, y(cut))], fill=(60, 90, 230))
        for i in np.argsort(keep, kind="stable"):  # red dots on top
            x = int(i * (width - 2) / max(1, len(s) - 1))
            draw.rectangle(
                [x, y(s[i]) - 1, x + 1, y(s[i])],
                fill=(220, 40, 40) if keep[i] else (150, 150, 150),
            )
        panels.append(np.asarray(canvas))
    return Image.fromarray(np.concatenate(panels, axis=0))


# ----------------------------------------------------------------------------------------
# Line charts (learning curves)
# ----------------------------------------------------------------------------------------

CURVE_COLOURS = [
    (31, 119, 180),
    (214, 39, 40),
    (44, 160, 44),
    (148, 103, 189),
    (255, 127, 14),
    (140, 86, 75),
    (127, 127, 127),
]


def _tick(value):
    if float(value).is_integer() and abs(value) < 1e7:  # steps: 1500, not 1.5e+03
        return str(int(value))
    return f"{value:.3g}"


def line_chart(series, title, x_label, y_label, width=640, height=240, y_range=None):
    """A line chart as (H, W, 3) uint8: `series` maps a name to (xs, ys). Axes with ticks
    at the ends and the middle, labelled; a legend in the top right; y_range fixes the y
    axis (e.g. (0.5, 1) for AUROCs), else it spans the data."""
    left, right, top, bottom = 58, 12, 22, 34
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    xs_all = [x for xs, _ in series.values() for x in xs]
    ys_all = [y for _, ys in series.values() for y in ys if y is not None and np.isfinite(y)]
    x0, x1 = (min(xs_all), max(xs_all)) if xs_all else (0, 1)
    y0, y1 = y_range if y_range else ((min(ys_all), max(ys_all)) if ys_all else (0, 1))
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1e-6)
    px = lambda x: left + (x - x0) / (x1 - x0) * (width - left - right)
    py = lambda y: (
        height - bottom - (min(max(y, y0), y1) - y0) / (y1 - y0) * (height - top - bottom)
    )
    draw.rectangle([left, top, width - right, height - bottom], outline=(0, 0, 0))
    for fraction in (0.0, 0.5, 1.0):
        x, y = x0 + fraction * (x1 - x0), y0 + fraction * (y1 - y0)
        draw.line([(px(x), height - bottom), (px(x), height - bottom + 4)], fill=(0, 0, 0))
        draw.text((px(x) - 12, height - bottom + 6), _tick(x), fill=(0, 0, 0))
        draw.line([(left - 4, py(y)), (left, py(y))], fill=(0, 0, 0))
        draw.text((2, py(y) - 6), _tick(y), fill=(0, 0, 0))
        draw.line([(left + 1, py(y)), (width - right - 1, py(y))], fill=(225, 225, 225))
    draw.text((max(left, 6 * len(y_label) + 12), 5), title, fill=(0, 0, 0))  # right of y_label
    draw.text(
        ((left + width - right) // 2 - 3 * len(x_label), height - 14), x_label, fill=(0, 0, 0)
    )
    draw.text((2, 5), y_label, fill=(90, 90, 90))
    colours = [CURVE_COLOURS[i % len(CURVE_COLOURS)] for i in range(len(series))]
    for colour, (xs, ys) in zip(colours, series.values()):
        points = [(px(x), py(y)) for x, y in zip(xs, ys) if y is not None and np.isfinite(y)]
        if len(points) > 1:
            draw.line(points, fill=colour, width=2)
        for x, y in points if len(points) <= 40 else []:
            draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=colour)
    legend_x = width - right - 6 - 6 * max((len(name) for name in series), default=0) - 12
    draw.rectangle(
        [legend_x - 4, top + 2, width - right - 2, top + 6 + 12 * len(series)],
        fill=(255, 255, 255),
        outline=(200, 200, 200),
    )
    for i, (colour, name) in enumerate(zip(colours, series)):
        draw.text((legend_x, top + 4 + 12 * i), f"- {name}", fill=colour)
    return np.asarray(canvas)
