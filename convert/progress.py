"""Conversion progress on stderr: a tqdm bar over the steps of a whole pass, advanced inside each layer.

A pass (measurement or quantization) is counted in steps that each cost about the same: one candidate recipe
tried on the attention block, one expert quantized with one candidate, one matrix quantized. The bar's ETA is
therefore meaningful a few seconds into the first layer instead of only after it. On a terminal the bar redraws
in place; when stderr is not a terminal (logs, tests) the bar is off and one line is written per finished layer.
"""

from __future__ import annotations

import sys
import time

from tqdm import tqdm


def _clock(seconds: float) -> str:
    return tqdm.format_interval(max(seconds, 0.0))


class Progress:
    def __init__(self, layers: int, steps_per_layer: int, desc: str, done: int = 0, stream=None):
        """`done` layers were finished before (a resumed conversion): they count as done, not towards the rate."""
        self.layers, self.steps, self.desc = layers, max(steps_per_layer, 1), desc
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.start, self.start_layers = time.time(), done
        self.bar = tqdm(
            total=layers * self.steps,
            initial=done * self.steps,
            desc=desc,
            unit="step",
            file=self.stream,
            disable=not self.tty,
            dynamic_ncols=True,
            mininterval=0.5,
            smoothing=0.1,
            bar_format="{desc} {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} steps [{elapsed}, eta {remaining}]"
            "{postfix}",
        )

    def step(self, n: int = 1) -> None:
        """`n` more steps of the current layer are done."""
        first = self.bar.n == self.start_layers * self.steps
        self.bar.update(n)
        if first:
            self.bar.refresh()  # an ETA after the first step, not only after tqdm's first interval

    def note(self, text: str) -> None:
        """What the current layer is doing (shown after the bar)."""
        self.bar.set_postfix_str(text, refresh=False)

    def layer_done(self, i: int, note: str = "") -> None:
        """Layer `i` is finished: the bar snaps to its end (step counts are estimates); one line without a tty."""
        self.bar.update((i + 1) * self.steps - self.bar.n)
        if self.tty:
            self.bar.set_postfix_str(note)
            return
        elapsed = time.time() - self.start
        rate = (i + 1 - self.start_layers) / elapsed if elapsed > 0 else 0.0
        eta = (self.layers - i - 1) / rate if rate > 0 else 0.0
        line = f"{self.desc} layer {i + 1}/{self.layers} [{_clock(elapsed)}, eta {_clock(eta)}]"
        self.stream.write(line + (f"  {note}" if note else "") + "\n")
        self.stream.flush()

    def close(self) -> None:
        self.bar.close()
