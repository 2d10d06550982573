"""Progress bars per task phase (tqdm), or plain log lines in quiet mode (CI logs)."""

from __future__ import annotations

import sys

from tqdm.auto import tqdm


class _Bar:
    def __init__(self, description: str, total: int, initial: int, enabled: bool) -> None:
        self._bar = tqdm(total=total, initial=initial, desc=description, unit="epoch", leave=False,
                         disable=not enabled or total == 0, file=sys.stderr)

    def update(self, logs: dict) -> None:
        self._bar.set_postfix({k: f"{float(v):.4f}" for k, v in logs.items()}, refresh=False)
        self._bar.update(1)

    def close(self) -> None:
        self._bar.close()


class Progress:
    """Creates a bar per training phase; `write` prints a line without breaking bars."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled

    def bar(self, description: str, total: int, initial: int = 0) -> _Bar:
        return _Bar(description, total, initial, self.enabled)

    def write(self, line: str) -> None:
        if self.enabled:
            tqdm.write(line, file=sys.stderr)
