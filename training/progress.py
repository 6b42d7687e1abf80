"""Training progress for a person: a tqdm bar when stderr is a terminal, plain periodic lines otherwise."""

from __future__ import annotations

import sys
from typing import TextIO

from tqdm import tqdm


def format_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    s = int(seconds)
    return f"{s // 3600}h{s // 60 % 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class Progress:
    """Writes to stderr; silent when disabled (ranks other than 0)."""

    def __init__(self, enabled: bool = True, stream: TextIO | None = None, interactive: bool | None = None) -> None:
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.interactive = self.stream.isatty() if interactive is None else interactive
        self._bar: tqdm | None = None

    def info(self, message: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(message, file=self.stream)
        else:
            print(message, file=self.stream, flush=True)

    def begin(self, total: int | None, initial: int) -> None:
        if self.enabled and self.interactive:
            self._bar = tqdm(total=total, initial=initial, file=self.stream, dynamic_ncols=True, unit="step")

    def step(self) -> None:
        if self._bar is not None:
            self._bar.update(1)

    def report(self, step: int, total: int | None, loss: float, lr: float, tokens_per_s: float, eta_s: float) -> None:
        """Called every log interval: refresh the bar's figures, or print a line."""
        if self._bar is not None:
            self._bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens_per_s:,.0f}", refresh=True)
        else:
            self.info(
                f"step {step}{'' if total is None else f'/{total}'} | loss {loss:.4f} | lr {lr:.2e} | "
                f"{tokens_per_s:,.0f} tok/s | "
                f"eta {format_seconds(eta_s)}"
            )

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
