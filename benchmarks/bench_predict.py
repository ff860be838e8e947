"""What streaming a production lot costs: evaluate.py --predict against scoring alone.

    nice -n 19 python3 benchmarks/bench_predict.py                   # 2,000 images at 128 px
    nice -n 19 python3 benchmarks/bench_predict.py --images 200 --out results/NAME.json

The model: demo.sh's scale (WideResNet50 layers 1-2 with random weights, AFS 32 + 64
channels, UNet width 0.25, RRS 16 + 16, 128 px), untrained (the time does not depend on
the weights' values), saved as a checkpoint with an OK/NG threshold so that every output is
written (maps, masks, pictures, CSV rows). The lot: --images copies of the demo data set's
test images (demo_data.py, drawn at 160 px so that each is resized, as a camera's would be).

Three measurements, each in its own process, run one after the other on the same lot:

  forward     the forward pass alone on one batch in memory (realnet/throughput.py)
  scoring     the lot read by the same DataLoader as --predict (--workers 2) and scored
              (map, image score), nothing written: "scoring alone"
  predict     evaluate.py --predict DIR: reading, scoring, and writing the whole lot
              (maps, masks, pictures, CSV), progress lines, the final rename

Reported: images/s of each, predict / scoring (the goal: >= 0.9), and the peak memory
(ru_maxrss) of predict's main process and of its loader workers. On a shared machine the
absolute rates move with the load; the ratio is of runs made minutes apart.
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
started = time.time()
with torch.no_grad():
    for batch in loader:
        maps = throughput.forward(model, features, batch["image"]).float()
        metrics.image_scores(maps.numpy())
seconds = time.time() - started
print(json.dumps({{"forward_images_per_s": forward["images_per_s"],
                   "scoring_images_per_s": len(paths) / seconds, "scoring_seconds": seconds}}))
"""

PREDICT = """
import resource, sys, json, time
sys.path.insert(0, {repo!r})
import evaluate
started = time.time()
evaluate.main({argv!r})
seconds = time.time() - started
print(json.dumps({{"predict_wall_seconds": seconds,
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
    afs = {"layers": list(layers), "dims": list(dims), "input_size": size,
           "indices": [list(range(0, c, c // d))[:d] for c, d in zip(channels, dims)],
           "scores": [torch.zeros(c) for c in channels], "backbone": identity}
    model = RealNet(build_config(afs, width_ratio=0.25, k_max=16, k_mean=16,
                                 strides=Backbone.strides))
    torch.save({"kind": "realnet", "version": 1, "config": model.config, "step": 0,
                "state_dict": model.state_dict(), "selected_on": {"rule": "a benchmark"},
                "backbone": identity, "categories": ["washer"],
                "threshold": {"rule": "fpr", "target_fpr": 0.5, "image": 0.5, "pixel": 0.5,
                              "image_score": "avgpool", "pool": 16,
                              "chosen_on": "a fixed value (benchmark)"}}, path)


def make_lot(root, n):
    """n copies of the demo data set's test images at 160 px."""
    from demo_data import make_demo_dataset
    from realnet import data
    source = make_demo_dataset(os.path.join(root, "demo"), categories=["washer"],
                               image_size=160, n_train=1, n_test_good=4, n_test_defect=4)
    originals = sorted(p for p, _, names in os.walk(os.path.join(source, "washer", "test"))
                       for p in [os.path.join(p, name) for name in names]
                       if data.is_image_file(p))
    folder = os.path.join(root, "lot")
    os.makedirs(folder)
    for i in range(n):
        shutil.copy(originals[i % len(originals)], os.path.join(folder, f"{i:05d}.png"))
    return folder


def in_process(code):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True,
                            text=True)
    if result.returncode != 0:
        raise SystemExit(f"a measurement failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1]), result.stdout


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
        scoring, _ = in_process(SCORING.format(repo=REPO, checkpoint=checkpoint, folder=folder,
                                               batch=args.batch_size, size=args.size,
                                               workers=args.workers))
        lot = os.path.join(root, "predicted")
        argv = ["--checkpoint", checkpoint, "--predict", folder, "--out", lot,
                "--batch-size", str(args.batch_size), "--workers", str(args.workers)]
        predicted, stdout = in_process(PREDICT.format(repo=REPO, argv=argv))
        described = json.load(open(os.path.join(lot, "lot.json")))
        sizes = sum(os.path.getsize(os.path.join(d, n)) for d, _, names in os.walk(lot)
                    for n in names)
        result = {
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
            "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
            "images": args.images, "input_size": args.size, "batch_size": args.batch_size,
            "workers": args.workers, **scoring,
            "predict_images_per_s": described["images_per_s"],
            "predict_wall_seconds": round(predicted["predict_wall_seconds"], 1),
            "ratio_predict_to_scoring": round(described["images_per_s"]
                                              / scoring["scoring_images_per_s"], 3),
            "main_peak_mib": round(predicted["main_peak_mib"], 1),
            "worker_peak_mib": round(predicted["worker_peak_mib"], 1),
            "peak_mib_main_plus_workers": round(predicted["main_peak_mib"]
                                                + args.workers * predicted["worker_peak_mib"], 1),
            "lot_mib_on_disk": round(sizes / 2**20, 1), "counts": described["counts"],
            "load_average_before_after": [load_before, os.getloadavg()],
            "progress_lines": [line for line in stdout.splitlines() if "predict step" in line][-2:]}
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
