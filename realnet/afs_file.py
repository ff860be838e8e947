"""Stage 3's AFS file, as stage 4 reads it: the channels it kept, and the settings it
was made with (data set, category, anomaly source, input size), which become
train_realnet.py's defaults. A flag that differs is used with a note; one that cannot fit
the kept channels (another input size, another category) is refused.

Stage 3 itself: an afs.pt is replaced only by one made with the same settings, and the
partial state (afs.partial) an interrupted run continues from.
"""

import os

from . import cli, runs
from .files import atomic_torch_save, load_checkpoint


def fill_from_afs(args, afs):
    """Stage 3 chose the anomaly source and input size: take them from the AFS file where
    no flag is given. A flag that differs is used, with a note (AFS chose its channels with
    the file's settings); another --input-size is refused."""
    source = afs.get("anomaly_source") or {}
    recorded = {
        "sdas": None if args.categories else source.get("sdas_dir"),  # unified: DIR/<c>
        "dtd": source.get("dtd_dir"),
        "foreground": source.get("foreground", "category"),
        "min_paste_contrast": source.get("min_paste_contrast", 0.0),
    }
    for name, value in recorded.items():
        given = getattr(args, name)
        if given is None:
            setattr(args, name, value)
        elif value is not None and given != value and os.path.abspath(str(given)) != value:
            print(f"note: {cli.flag(name)} {given} differs from the AFS file's {value}")
    if args.input_size not in (None, afs["input_size"]):
        raise cli.UserError(
            f"--afs {args.afs!r} was made at input size {afs['input_size']}, not "
            f"--input-size {args.input_size}: run select_features.py with "
            f"--input-size {args.input_size}"
        )
    args.input_size = afs["input_size"]


def open_inputs(args, device):
    """Read the AFS file once; from it (and the flags): the data set, the categories, the
    frozen backbone and the model configuration. `args` is completed with the values taken
    from the AFS file, so that args.json says what the run used (train_realnet.py)."""
    from .backbone import load_recorded_backbone  # stage 4's readers: stage 3 needs none here
    from .data import open_recorded_dataset
    from .files import load_checkpoint
    from .model import build_config

    afs = load_checkpoint(args.afs, "--afs", kind="afs")
    fill_from_afs(args, afs)
    what = f"--afs {args.afs!r}"
    dataset = open_recorded_dataset(args.data, args.format, afs.get("dataset"), what)
    args.data, args.format = dataset.root, dataset.format
    categories = chosen_categories(
        args.category, args.categories, afs.get("category"), dataset, args.afs
    )
    backbone = load_recorded_backbone(
        afs.get("backbone"), args.backbone_weights, afs["layers"], what
    )
    config = build_config(
        afs,
        args.arch,
        args.width_ratio,
        args.retention,
        args.k_max,
        args.k_mean,
        args.input_size,
        strides=backbone.strides,
        anomaly_map=args.anomaly_map,
    )
    return afs, dataset, categories, backbone.to(device), config | {"backbone": backbone.identity}


def chosen_categories(category, categories, afs_category, dataset, afs_path):
    """--category (one model, the paper) or --categories (unified); default the AFS file's."""
    if category and categories:
        raise cli.UserError(
            "give --category (one model per category) or --categories (unified), not both"
        )
    names = cli.parse_list(categories) if categories else [category or afs_category]
    for name in names:
        dataset.class_id(name)  # UserError if missing
    if afs_category not in names:
        raise cli.UserError(
            f"--afs {afs_path!r} was made for category {afs_category!r}, not "
            f"{' / '.join(names)}: run select_features.py for this category"
        )
    return names


# arguments that do not change the AFS file (where and how fast it is computed)
RUN_ONLY = ("out", "dump", "workers", "device", "save_every")


def require_same_afs(path, args):
    """An afs.pt already in --out is replaced only by one made with the same settings: a
    rerun with other --dims (say) would otherwise silently replace what train_realnet.py
    runs may have been made from."""
    if not os.path.isfile(path):
        return
    recorded = load_checkpoint(path, f"--out: the existing {path!r}", kind="afs").get("args", {})
    settings = lambda values: {cli.flag(k): v for k, v in values.items() if k not in RUN_ONLY}
    runs.require_same_settings(
        settings(recorded),
        settings(cli.args_to_dict(args)),
        f"--out: {path!r} was made with other settings",
        "choose another --out or delete it first",
    )


class PartialState:
    """afs.partial: the losses summed so far by a run, saved every `save_every` batches (not
    after the last one: the AFS file follows) and continued from when a run with the same
    settings starts again. The stream is a pure function of (seed, g), so continuing a
    partial sum gives exactly the result of an uninterrupted run."""

    def __init__(self, path, settings, batches, save_every):
        self.path, self.settings = path, settings
        self.batches, self.save_every = batches, save_every

    def load(self):
        """(batches done, their summed losses) of an interrupted run with the same settings,
        or (0, None)."""
        path, batches = self.path, self.batches
        if not os.path.isfile(path):
            return 0, None
        partial = load_checkpoint(path, "partial AFS state", kind="afs_partial")
        changed = runs.differences(partial["settings"], self.settings)
        if not changed and partial["batches_done"] <= batches:
            print(f"resuming from {path}: {partial['batches_done']} of {batches} batches done")
            return partial["batches_done"], partial["sums"]
        why = (
            "; ".join(changed)
            or f"{partial['batches_done']} batches done, --batches {batches} now"
        )
        print(f"starting afresh: {path} was made with other settings ({why})")
        return 0, None

    def save(self, batches_done, sums):
        if batches_done % self.save_every == 0 and batches_done < self.batches:
            state = {"settings": self.settings, "batches_done": batches_done, "sums": sums}
            atomic_torch_save({"kind": "afs_partial", **state}, self.path)

    def remove(self):
        """Once the AFS file is written."""
        if os.path.exists(self.path):
            os.remove(self.path)
