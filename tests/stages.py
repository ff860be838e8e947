"""Running a stage in a test, one way for every test file: `run(script, *args)`.

    run("train_realnet.py", "--afs", ...)              a real `python3 script args` process
    run("train_realnet.py", ..., in_process=True)      its main(argv) in this process, through
                                                       cli.run (no interpreter start-up)
    run("-m", "realnet.calibration", ...)               a module, as `python3 -m NAME args`

Both give (returncode, stdout, stderr); check=True (the default) fails the test with both
streams when the stage did not succeed. `one_line_error` asserts what a refused input must
give: exit code 2, no traceback, one "error: ..." line.
"""

import contextlib
import importlib
import io
import os
import subprocess
import sys

from realnet import cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "PYTHONPATH": REPO}
RANDOM_BACKBONE_WARNING = "WARNING: --backbone-weights random"


class Result:
    def __init__(self, returncode, stdout, stderr):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def run(script, *args, check=True, env=ENV, launcher=None, in_process=False):
    """A stage script of the repository (or, for script "-m", a module: -m NAME ...)."""
    if in_process:
        stage = importlib.import_module(os.path.splitext(script)[0])
        out, err = io.StringIO(), io.StringIO()
        code = 0
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                cli.run(lambda: stage.main([str(a) for a in args]))
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        result = Result(code, out.getvalue(), err.getvalue())
    else:
        target = ["-m"] if script == "-m" else [os.path.join(REPO, script)]
        command = (launcher or [sys.executable]) + target + [*map(str, args)]
        result = subprocess.run(
            command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600
        )
    if check and result.returncode != 0:
        raise AssertionError(
            f"{script} failed ({result.returncode}):\n{result.stdout[-3000:]}\n"
            f"{result.stderr[-3000:]}"
        )
    return result


def succeeded(result):
    assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-3000:])
    return result


def one_line_error(result, *fragments, alone=False):
    """Exit code 2, no traceback, exactly one 'error: ...' line on stderr containing every
    fragment; with alone=True nothing else on stderr but the random backbone's warning.
    Returns the line."""
    assert result.returncode == 2, (
        result.returncode,
        result.stdout[-2000:],
        result.stderr[-3000:],
    )
    assert "Traceback" not in result.stderr
    if alone:
        lines = [
            line
            for line in result.stderr.strip().splitlines()
            if not line.startswith(RANDOM_BACKBONE_WARNING)
        ]
        assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    else:
        lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def train_args(demo, out, *extra, steps=6):
    """train_realnet.py's flags for a few steps on the `demo` fixture's tiny data set."""
    return [
        "--data",
        demo["data"],
        "--category",
        "washer",
        "--dtd",
        demo["dtd"],
        "--afs",
        demo["afs"],
        "--width-ratio",
        "0.5",
        "--batch-size",
        "4",
        "--steps",
        steps,
        "--lr",
        "1e-3",
        "--workers",
        "0",
        "--log-every",
        "1",
        "--out",
        out,
        *extra,
    ]
