"""The training-step benchmark at the smallest scale: it runs, names every part of a step,
and the parts add up to the step (timings themselves are not asserted: they live in
benchmarks/results/); the inference benchmark refuses a variant it does not know."""

import json
import os
import subprocess
import sys

import pytest
import torch

sys.path.insert(
    0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
)

import bench_train_step  # noqa: E402


@pytest.mark.filterwarnings("ignore")
def test_train_step_parts_add_up(tmp_path, capsys):
    out = tmp_path / "step.json"
    threads = torch.get_num_threads()  # main() sets one thread on the CPU: give them back
    try:
        bench_train_step.main(
            [
                "--input-size",
                "64",
                "--dims",
                "8",
                "16",
                "--batch-size",
                "2",
                "--precisions",
                "fp32",
                "--repeats",
                "2",
                "--warmup",
                "1",
                "--json",
                str(out),
            ]
        )
    finally:
        torch.set_num_threads(threads)
    printed = capsys.readouterr().out
    (row,) = json.loads(out.read_text())["rows"]
    parts = [row[part] for part in bench_train_step.PARTS]
    assert all(t > 0 for t in parts), row  # every part was reached, in order
    # medians of each part need not add up exactly to the median of the sums
    assert sum(parts) == pytest.approx(row["step_ms"], rel=0.5), row
    assert row["model_ms"] < row["step_ms"]
    for what in bench_train_step.PARTS.values():
        assert what in printed


@pytest.mark.parametrize(
    "flag, value", [("--variants", "eager"), ("--precisions", "fp8"), ("--batches", "x")]
)
def test_inference_benchmark_refuses_unknown_choices_in_one_line(flag, value):
    script = os.path.join(os.path.dirname(bench_train_step.__file__), "bench_inference.py")
    done = subprocess.run(
        [sys.executable, script, "--device", "cpu", flag, value],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode != 0
    assert done.stderr.strip().startswith(f"error: {flag} {value}"), done.stderr
    assert "Traceback" not in done.stderr


def test_op_benchmark_checks_the_goals_it_reports():
    """bench_ops.goals turns one run's rows into the kernels' goals: the ratios and the share
    of peak bandwidth are computed from the rows, and a missed goal is reported as missed."""
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from benchmarks import bench_ops

    def row(op, which, dtype, impl, seconds, fraction=None):
        r = {
            "op": op,
            "pass": which,
            "dtype": dtype,
            "impl": impl,
            "seconds": seconds,
            "batch": 16,
            "bytes_moved": 1,
            "gb_per_s": 1,
            "peak_bytes": 0,
        }
        if fraction is not None:
            r["peak_fraction"] = fraction
        return r

    rows = [
        row("rrs_select", "forward+backward", "float32", "fused v2", 1.0, 0.65),
        row("rrs_select", "forward+backward", "float32", "reference", 4.0),
        row("rrs_select", "forward+backward", "float32", "compiled reference", 2.0),
        row("rrs_select", "forward", "float32", "fused v2", 0.5),
        row("rrs_select", "forward", "float32", "compiled reference", 0.6),
        row("rrs_select", "forward", "bfloat16", "fused v2", 0.25),
        row("afs_channel_loss", "forward", "float32", "fused v2", 1.0),
        row("afs_channel_loss", "forward", "float32", "reference", 6.0),
        {
            "op": "afs_channel_loss",
            "pass": "forward",
            "dtype": "float32",
            "impl": "compiled reference",
            "error": "compile failed",
        },
    ]
    checked = {goal: (value, met) for goal, value, met in bench_ops.goals(rows)}
    assert checked["fused v2: rrs_select fwd+bwd fp32 >= 60 % of peak bandwidth"] == (
        "65.0 %",
        True,
    )
    assert checked["fused v2: rrs_select fwd+bwd fp32 >= 5.0x reference"] == ("4.00x", False)
    assert checked["fused v2: rrs_select fwd+bwd fp32 >= 1.5x compiled reference"] == (
        "2.00x",
        True,
    )
    assert checked["fused v2: rrs_select forward fp32 >= 1.5x compiled reference"] == (
        "1.20x",
        False,
    )
    assert checked["fused v2: rrs_select forward bfloat16 <= 0.6x its fp32 time"] == (
        "0.50x",
        True,
    )
    assert checked["fused v2: afs_channel_loss fp32 >= 5.0x reference"] == ("6.00x", True)
    assert not any(
        "afs_channel_loss fp32 >= 1.5x compiled" in goal for goal in checked
    )  # no row: no claim
    table = bench_ops.markdown(
        {
            "device": "test",
            "torch": "x",
            "date": "d",
            "batch": 16,
            "repeats": 1,
            "peak_bandwidth": 1e12,
            "command": "c",
            "results": rows,
        }
    )
    assert "failed: compile failed" in table and "| **no** |" in table


def test_learning_curves_reads_runs_and_tables_and_refuses_a_bad_curve(tmp_path, capsys):
    import learning_curves
    from realnet.cli import UserError

    run = tmp_path / "realnet"
    run.mkdir()
    with open(run / "val.jsonl", "w") as f:
        for step, value in ((500, 0.8), (1000, 0.9), (1300, 0.95)):  # a run cut short at 1300
            f.write(json.dumps({"step": step, "pixel_auroc": value}) + "\n")
    out = str(tmp_path / "curves")
    learning_curves.main(
        ["--curve", f"sand:C=1.5={run}", "--curve", "sand:C=0=500:0.6,1000:0.62,1500:0.64",
         "--out", out]
    )  # fmt: skip
    table = capsys.readouterr().out
    assert "| sand | C=1.5 | 0.800 / 0.900 / 0.950 (1300) |" in table  # the last step it reached
    assert "| sand | C=0 | 0.600 / 0.620 / 0.640 |" in table
    saved = json.load(open(out + ".json"))
    assert [c["values"] for c in saved["curves"]] == [[0.8, 0.9, 0.95], [0.6, 0.62, 0.64]]
    assert saved["command"][-4:] == [
        "--curve",
        "sand:C=0=500:0.6,1000:0.62,1500:0.64",
        "--out",
        out,
    ]
    assert os.path.getsize(out + ".png") > 0
    for bad in ("sand=missing", "sand:x=no/such/run"):
        with pytest.raises(UserError, match="--curve"):
            learning_curves.main(["--curve", bad, "--out", out])


def test_demo_accuracy_merges_saved_tables_and_merges_of_them(tmp_path):
    """benchmarks/demo_accuracy.py --table: seeds of one category from several files are
    united, and a file that is itself a merge adds its commands as items, not as a list."""
    import demo_accuracy

    def saved(name, command, seeds, date="2026-12-05"):
        row = {"baseline": {"pixel_auroc": 0.9}, "seeds": {s: {"fused": {}} for s in seeds}}
        path = tmp_path / name
        path.write_text(
            json.dumps(
                {
                    "date": date,
                    "machine": "cpu",
                    "command": command,
                    "tuning": {"granite": "tuned"},
                    "categories": {"granite": row},
                }
            )
        )
        return str(path)

    first = demo_accuracy.merge_saved(
        [saved("a.json", "run a", ["0"]), saved("b.json", "run b", ["1"])]
    )
    (tmp_path / "ab.json").write_text(json.dumps(first))
    merged = demo_accuracy.merge_saved(
        [str(tmp_path / "ab.json"), saved("c.json", "run c", ["2"], date="2026-12-06")]
    )
    assert merged["command"] == ["run a", "run b", "run c"]
    assert merged["date"] == ["2026-12-05", "2026-12-06"]
    assert sorted(merged["categories"]["granite"]["seeds"]) == ["0", "1", "2"]
