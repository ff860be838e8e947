"""What train_realnet.py writes, and how a run continues from it.

    model.pt    the model of the last step: what evaluate.py reads (config, weights, the
                settings of the run, the calibration once training is over)
    best.pt     the same for the step that scored best on the held-out training images
    state.pt    everything --resume needs: model, optimiser, loss scaler, random states

No backbone weights are stored: they are reloaded from the recorded identity
(backbone.load_recorded_backbone), so a checkpoint stays small and cannot hide another backbone.
"""

import os

from . import runs
from .files import atomic_torch_save, file_digest, prepare_output_folder


def output_folder(out, categories, ddp):
    """--out (default runs/<categories>/realnet), locked, with stale files of another run
    refused (files.prepare_output_folder)."""
    out = out or os.path.join("runs", "_".join(categories), "realnet")
    prepare_output_folder(
        out,
        clean=ddp.is_main,
        files=("model.pt", "state.pt", "best.pt", "args.json", runs.LOG_FILE),
        subfolders=("examples",),
    )
    return out


def run_settings(args, afs, dataset, categories, train_images):
    """The settings a resumed run must share with the run it continues (resume compares
    them; a refused --resume names the flag that changed)."""
    path = lambda folder: folder and os.path.abspath(folder)
    return {
        "categories": categories,
        "unified": len(categories) > 1,
        "dataset": dataset.describe(),
        "afs": {"digest": file_digest(args.afs), "category": afs["category"]},
        "anomaly_source": {
            "--sdas": path(args.sdas),
            "--dtd": path(args.dtd),
            "--foreground": args.foreground,
            "--normal-ratio": args.normal_ratio,
        },
        # by flag name, so that a refused --resume names the flag that changed
        "training": {
            "--batch-size": args.batch_size,
            "--lr": args.lr,
            "--discriminator-lr-scale": args.discriminator_lr_scale,
            "--lr-schedule": args.lr_schedule,
            "--seed": args.seed,
            "--precision": args.precision,
            "train_images": train_images,
            "--val-fraction": args.val_fraction,
            "--val-samples": args.val_samples,
            "--val-metric": args.val_metric,
        },
        "calibration_settings": {
            "--threshold-rule": args.threshold_rule,
            "--target-fpr": args.target_fpr,
            "--calibrate-precision": args.calibrate_precision,
        },
    }


def model_file(model, run, step, selected_on, extra):
    """What evaluate.py reads: everything needed to rebuild the model, no backbone weights
    (they are reloaded from --backbone-weights and checked against `backbone`)."""
    return {
        "kind": "realnet",
        "version": 1,
        "config": model.config,
        "step": step,
        "state_dict": model.state_dict(),
        "selected_on": selected_on,
        "backbone": model.config["backbone"],
        "calibration": None,  # set after training
        **run,
        **extra,
    }


def save_run(out, model, optimizer, scaler, run, step, best, extra):
    """model.pt (the last step) and state.pt (everything --resume needs), both atomic."""
    last = {"rule": "last step", "step": step}
    atomic_torch_save(model_file(model, run, step, last, extra), os.path.join(out, "model.pt"))
    atomic_torch_save(
        {
            "kind": "realnet_state",
            "version": 1,
            "config": model.config,
            "run": run,
            "step": step,
            "model": model.state_dict(),
            "best": best,
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict(),
            "rng": runs.rng_state(),
        },
        os.path.join(out, runs.STATE_FILE),
    )


def save_best(out, model, run, step, selected_on, extra):
    """best.pt: the model of `step`, with why it was selected."""
    atomic_torch_save(
        model_file(model, run, step, selected_on, extra), os.path.join(out, "best.pt")
    )


def resume(state, model, optimizer, scaler, run, out):
    """Continue from a state made with the same model and training settings: (step, best)."""
    if state is None:
        return 0, {"value": None, "step": None}
    path = os.path.join(out, runs.STATE_FILE)
    for saved, now, what in (
        (state["config"], model.config, "another model configuration"),
        (state["run"], run, "other training settings"),
    ):
        runs.require_same_settings(
            saved,
            now,
            f"--resume: {path!r} was made with {what}",
            "use the same arguments or another --out",
        )
    runs.restore_training(model, optimizer, state)  # the model is on its device already
    if state.get("scaler"):  # fp16 only; the run settings make sure the precision is the same
        scaler.load_state_dict(state["scaler"])
    runs.restore_rng(state["rng"])
    return state["step"], state["best"]
