"""One progress line per step group: step, metrics, rate, time left.

No tqdm: the lines are plain prints so they read the same in a terminal, a log file and
CI, e.g.
    train  step  120/1000 | loss 0.4312 | 14.2 img/s | elapsed 0:01:10 | left 0:10:21
"""

import sys
import time


def format_seconds(seconds):
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class Progress:
    def __init__(
        self, total, label="", unit="img", every=10, start_step=0, enabled=True, stream=None
    ):
        """`total` steps in all; `every` steps between lines (the last step always prints).

        `start_step` is where a resumed run starts, so the rate and the time left are
        computed from the steps done in this process only.
        """
        self.total, self.label, self.unit, self.every = total, label, unit, max(1, every)
        self.enabled = enabled
        self.stream = stream or sys.stdout
        self.start_step = start_step
        self.start_time = time.time()
        self.items = 0

    def update(self, step, items=0, **metrics):
        """Record that `step` (1-based) is done and processed `items` images."""
        self.items += items
        if not self.enabled or (step % self.every and step != self.total):
            return
        elapsed = time.time() - self.start_time
        done = step - self.start_step
        left = elapsed / done * (self.total - step) if done > 0 else 0.0
        parts = [f"{self.label} step {step:>{len(str(self.total))}}/{self.total}".strip()]
        parts += [
            f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items()
        ]
        if self.items:
            parts.append(f"{self.items / max(elapsed, 1e-9):.1f} {self.unit}/s")
        parts.append(f"elapsed {format_seconds(elapsed)}")
        parts.append(f"left {format_seconds(left)}")
        print(" | ".join(parts), file=self.stream, flush=True)
