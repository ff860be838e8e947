"""The training-step benchmark at the smallest scale: it runs, names every part of a step,
and the parts add up to the step (timings themselves are not asserted: they live in
benchmarks/results/); the inference benchmark refuses a variant it does not know."""
import json
import os
import subprocess
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

import bench_train_step  # noqa: E402


@pytest.mark.filterwarnings("ignore")
def test_train_step_parts_add_up(tmp_path, capsys):
    out = tmp_path / "step.json"
    threads = torch.get_num_threads()   # main() sets one thread on the CPU: give them back
    try:
        bench_train_step.main(["--input-size", "64", "--dims", "8", "16", "--batch-size", "2",
                               "--precisions", "fp32", "--repeats", "2", "--warmup", "1",
                               "--json", str(out)])
    finally:
        torch.set_num_threads(threads)
    printed = capsys.readouterr().out
    (row,) = json.loads(out.read_text())["rows"]
    parts = [row[part] for part in bench_train_step.PARTS]
    assert all(t > 0 for t in parts), row           # every part was reached, in order
    # medians of each part need not add up exactly to the median of the sums
    assert sum(parts) == pytest.approx(row["step_ms"], rel=0.5), row
    assert row["model_ms"] < row["step_ms"]
    for what in bench_train_step.PARTS.values():
        assert what in printed


@pytest.mark.parametrize("flag, value", [("--variants", "eager"), ("--precisions", "fp8"),
                                         ("--batches", "x")])
def test_inference_benchmark_refuses_unknown_choices_in_one_line(flag, value):
    script = os.path.join(os.path.dirname(bench_train_step.__file__), "bench_inference.py")
    done = subprocess.run([sys.executable, script, "--device", "cpu", flag, value],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert done.stderr.strip().startswith(f"error: {flag} {value}"), done.stderr
    assert "Traceback" not in done.stderr
