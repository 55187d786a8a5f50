"""The logger of one hotkey's lines: where one process mines several hotkeys, each of its lines names the hotkey.

With one hotkey the lines are the package logger's, unchanged. With several (mine --hotkeys, mining/hotkeys.py)
a drop, a gap, a late group, a re-issued claim or a self-check says whose window it was: "window 12 group 3
dropped" alone could be any hotkey's (the per-window summary names its file, the other lines did not).
"""

from __future__ import annotations

import logging
from collections.abc import MutableMapping
from typing import Any

logger = logging.getLogger("grail_pipeline")

Log = logging.Logger | logging.LoggerAdapter


class _HotkeyLog(logging.LoggerAdapter):
    def process(self, msg: Any, kwargs: MutableMapping[str, Any]) -> tuple[Any, MutableMapping[str, Any]]:
        return f"[{self.extra['hotkey'][:8]}] {msg}", kwargs


def hotkey_logger(hotkey: str, several: bool) -> Log:
    """The logger of `hotkey`'s lines: prefixed with its address's first 8 characters when `several` hotkeys
    share this process, the package logger otherwise."""
    return _HotkeyLog(logger, {"hotkey": hotkey}) if several else logger
