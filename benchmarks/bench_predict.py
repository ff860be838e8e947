"""What streaming a production lot costs: evaluate.py --predict against scoring alone.

    nice -n 19 python3 benchmarks/bench_predict.py                   # 2,000 images at 128 px
    nice -n 19 python3 benchmarks/bench_predict.py --images 200 --out results/NAME.json

The model: demo.sh's scale (WideResNet50 layers 1-2 with random weights, AFS 32 + 64
channels, UNet width 0.25, RRS 16 + 16, 128 px), untrained (the time does not depend on
the weights' values), saved as a checkpoint with an OK/NG threshold so that every output is
written (maps, masks, pictures, CSV rows). The lot: --images copies of the demo data set's
test images (demo_data.py, drawn at 160 px so that each is resized, as a camera's would be).

Measurements, each in its own process, on the same lot: scoring, predict, scoring again
(a shared machine's load drifts; predict is compared with the mean of the two):

  forward     the forward pass alone on one batch in memory (realnet/throughput.py)
  scoring     the lot read by the same DataLoader as --predict (--workers 2) and scored
              (map, image score), nothing written: "scoring alone"
  predict     evaluate.py --predict DIR (predict.predict_folder, after the model is loaded, as
              for scoring): reading, scoring, and writing the whole lot (maps, masks,
              pictures, CSV), progress lines, the flush to disk and the final rename

Reported: images/s of each and predict / scoring (the goal: >= 0.9); the same ratio in CPU
time per image (main process and its loader workers, which a shared machine's load moves
much less than wall time); the peak memory: ru_maxrss of predict's main process, of its
largest loader worker, and the peak of the whole process tree's PSS (proportional set
size, sampled every 0.2 s: forked workers share most of the parent's pages, so adding
their RSS would count those pages three times).
"""

import argparse
import datetime
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

SCORING = """
import sys, time, json, torch
sys.path.insert(0, {repo!r})
import evaluate
from realnet import data, metrics, predict, throughput
model, features, _ = evaluate.load_model({checkpoint!r}, None, torch.device("cpu"))
paths = data.list_images({folder!r})
images = torch.stack([predict.LotImages(paths[:{batch}], {size})[i]["image"]
                      for i in range({batch})])
forward = throughput.measure(model, features, images, 3)
loader = torch.utils.data.DataLoader(predict.LotImages(paths, {size}), batch_size={batch},
                                     num_workers={workers})
import resource
def cpu():
    own, workers = (resource.getrusage(w) for w in (resource.RUSAGE_SELF,
                                                     resource.RUSAGE_CHILDREN))
    return own.ru_utime + own.ru_stime + workers.ru_utime + workers.ru_stime
started, cpu_started = time.time(), cpu()
with torch.no_grad():
    for batch in loader:
        maps = throughput.forward(model, features, batch["image"]).float()
        metrics.image_scores(maps.numpy())
del loader
seconds = time.time() - started
print(json.dumps({{"forward_images_per_s": forward["images_per_s"],
                   "images_per_s": len(paths) / seconds, "seconds": seconds,
                   "cpu_seconds": cpu() - cpu_started}}))
"""

PREDICT = """
import resource, sys, json, time, torch
sys.path.insert(0, {repo!r})
import evaluate
from realnet import calibration, predict
def cpu():
    own, workers = (resource.getrusage(w) for w in (resource.RUSAGE_SELF,
                                                     resource.RUSAGE_CHILDREN))
    return own.ru_utime + own.ru_stime + workers.ru_utime + workers.ru_stime
# evaluate.py --predict as main() runs it, the model's loading left out of the time (the
# scoring measurement leaves it out too)
args = evaluate.parse_args({argv!r})
evaluate.check_args(args)
model, features, ckpt = evaluate.load_model(args.checkpoint, None, torch.device("cpu"))
calibrated = calibration.for_run(model, ckpt.get("calibration"), None, None, None,
                                 args.image_score, args.pool, args.precision)
started, cpu_started = time.time(), cpu()
predict.predict_folder(args, model, features, calibrated, torch.device("cpu"))
seconds = time.time() - started
print(json.dumps({{"predict_wall_seconds": seconds, "cpu_seconds": cpu() - cpu_started,
                   "main_peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                   "worker_peak_mib":
                       resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}}))
"""


def make_checkpoint(path, size):
    import torch
    from realnet.backbone import Backbone, load_backbone
    from realnet.model import RealNet, build_config

    layers, dims = (1, 2), (32, 64)
    identity = load_backbone("random", layers).identity
    channels = [Backbone.channels[layer - 1] for layer in layers]
    afs = {
        "layers": list(layers),
        "dims": list(dims),
        "input_size": size,
        "indices": [list(range(0, c, c // d))[:d] for c, d in zip(channels, dims)],
        "scores": [torch.zeros(c) for c in channels],
        "backbone": identity,
    }
    model = RealNet(
        build_config(afs, width_ratio=0.25, k_max=16, k_mean=16, strides=Backbone.strides)
    )
    torch.save(
        {
            "kind": "realnet",
            "version": 1,
            "config": model.config,
            "step": 0,
            "state_dict": model.state_dict(),
            "selected_on": {"rule": "a benchmark"},
            "backbone": identity,
            "categories": ["washer"],
            "threshold": {
                "rule": "fpr",
                "target_fpr": 0.5,
                "image": 0.5,
                "pixel": 0.5,
                "image_score": "avgpool",
                "pool": 16,
                "chosen_on": "a fixed value (benchmark)",
            },
        },
        path,
    )


def make_lot(root, n):
    """n copies of the demo data set's test images at 160 px."""
    from demo_data import make_demo_dataset
    from realnet import data

    source = make_demo_dataset(
        os.path.join(root, "demo"),
        categories=["washer"],
        image_size=160,
        n_train=1,
        n_test_good=4,
        n_test_defect=4,
    )
    originals = sorted(
        p
        for p, _, names in os.walk(os.path.join(source, "washer", "test"))
        for p in [os.path.join(p, name) for name in names]
        if data.is_image_file(p)
    )
    folder = os.path.join(root, "lot")
    os.makedirs(folder)
    for i in range(n):
        shutil.copy(originals[i % len(originals)], os.path.join(folder, f"{i:05d}.png"))
    return folder


def tree_pss_mib(pid):
    """The summed PSS of a process and its descendants (Linux /proc), MiB; 0 once gone."""
    total, todo = 0, [pid]
    while todo:
        current = todo.pop()
        try:
            with open(f"/proc/{current}/smaps_rollup") as f:
                total += sum(int(line.split()[1]) for line in f if line.startswith("Pss:"))
            for task in os.listdir(f"/proc/{current}/task"):
                with open(f"/proc/{current}/task/{task}/children") as f:
                    todo += [int(child) for child in f.read().split()]
        except (OSError, ValueError):
            continue
    return total / 1024


def in_process(code):
    """Run a measurement in a fresh process; returns (its JSON line, its stdout, the peak
    PSS of its process tree in MiB)."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    child = subprocess.Popen(
        [sys.executable, "-c", code],
        cwd=REPO,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    peak = 0.0
    while child.poll() is None:
        peak = max(peak, tree_pss_mib(child.pid))
        time.sleep(0.2)
    stdout, stderr = child.communicate()
    if child.returncode != 0:
        raise SystemExit(f"a measurement failed:\n{stderr[-3000:]}")
    return json.loads(stdout.strip().splitlines()[-1]), stdout, peak


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--out", default=None, help="write the numbers to this JSON file")
    args = p.parse_args()
    root = tempfile.mkdtemp(prefix="bench_predict.")
    try:
        checkpoint = os.path.join(root, "run", "model.pt")
        os.makedirs(os.path.dirname(checkpoint))
        make_checkpoint(checkpoint, args.size)
        folder = make_lot(root, args.images)
        load_before = os.getloadavg()
        scoring_code = SCORING.format(
            repo=REPO,
            checkpoint=checkpoint,
            folder=folder,
            batch=args.batch_size,
            size=args.size,
            workers=args.workers,
        )
        first, _, _ = in_process(scoring_code)
        lot = os.path.join(root, "predicted")
        argv = [
            "--checkpoint",
            checkpoint,
            "--predict",
            folder,
            "--out",
            lot,
            "--batch-size",
            str(args.batch_size),
            "--workers",
            str(args.workers),
        ]
        predicted, stdout, peak_pss = in_process(PREDICT.format(repo=REPO, argv=argv))
        second, _, _ = in_process(scoring_code)
        described = json.load(open(os.path.join(lot, "lot.json")))
        sizes = sum(
            os.path.getsize(os.path.join(d, n)) for d, _, names in os.walk(lot) for n in names
        )
        scoring_rate = (first["images_per_s"] + second["images_per_s"]) / 2
        scoring_cpu = (first["cpu_seconds"] + second["cpu_seconds"]) / 2
        predict_rate = args.images / predicted["predict_wall_seconds"]
        result = {
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs "
            f"({len(os.sched_getaffinity(0))} usable)",
            "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
            "images": args.images,
            "input_size": args.size,
            "batch_size": args.batch_size,
            "workers": args.workers,
            "forward_images_per_s": [
                first["forward_images_per_s"],
                second["forward_images_per_s"],
            ],
            "scoring_images_per_s": [
                round(first["images_per_s"], 3),
                round(second["images_per_s"], 3),
            ],
            "predict_images_per_s_whole_run": round(predict_rate, 3),
            "predict_images_per_s_lot_json": described["images_per_s"],
            "ratio_predict_to_scoring_wall": round(predict_rate / scoring_rate, 3),
            "cpu_seconds_per_image": {
                "scoring": round(scoring_cpu / args.images, 4),
                "predict": round(predicted["cpu_seconds"] / args.images, 4),
            },
            "ratio_predict_to_scoring_cpu": round(scoring_cpu / predicted["cpu_seconds"], 3),
            "predict_wall_seconds": round(predicted["predict_wall_seconds"], 1),
            "scoring_wall_seconds": [round(first["seconds"], 1), round(second["seconds"], 1)],
            "main_peak_rss_mib": round(predicted["main_peak_mib"], 1),
            "largest_worker_peak_rss_mib": round(predicted["worker_peak_mib"], 1),
            "process_tree_peak_pss_mib": round(peak_pss, 1),
            "lot_mib_on_disk": round(sizes / 2**20, 1),
            "counts": described["counts"],
            "load_average_before_after": [load_before, os.getloadavg()],
            "progress_lines": [line for line in stdout.splitlines() if "predict step" in line][
                -2:
            ],
        }
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(json.dumps(result, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
            f.write("\n")


if __name__ == "__main__":
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    started = time.time()
    main()
    print(f"benchmark took {time.time() - started:.0f} s")
