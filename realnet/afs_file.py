"""Stage 3's AFS file, as stage 4 reads it: the channels it kept, and the settings it
was made with (data set, category, anomaly source, input size), which become
train_realnet.py's defaults. A flag that differs is used with a note; one that cannot fit
the kept channels (another input size, another category) is refused.
"""

import os

from . import cli


def fill_from_afs(args, afs):
    """Stage 3 chose the anomaly source and input size: take them from the AFS file where
    no flag is given. A flag that differs is used, with a note (AFS chose its channels with
    the file's settings); another --input-size is refused."""
    source = afs.get("anomaly_source") or {}
    recorded = {
        "sdas": None if args.categories else source.get("sdas_dir"),  # unified: DIR/<c>
        "dtd": source.get("dtd_dir"),
        "foreground": source.get("foreground", "category"),
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
