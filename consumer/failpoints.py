"""Named crash points for fault tests: `LLM_CONSUMER_FAILPOINTS="after_produce:2"`.

A process that reaches the named point for the N-th time kills itself with SIGKILL, so tests can
crash it exactly where at-least-once delivery matters (outputs acknowledged, offsets not yet
committed) instead of hoping a random kill lands there. Unset, every check is one dict lookup.
"""

from __future__ import annotations

import os
import signal
from collections import Counter

_armed: dict[str, int] = {}
for _entry in filter(None, os.environ.get("LLM_CONSUMER_FAILPOINTS", "").split(",")):
    _name, _, _count = _entry.partition(":")
    _armed[_name.strip()] = int(_count or 1)
_reached: Counter[str] = Counter()


def reach(name: str) -> None:
    """Crash here if this failpoint is armed and this is the armed occurrence."""
    if name not in _armed:
        return
    _reached[name] += 1
    if _reached[name] == _armed[name]:
        os.kill(os.getpid(), signal.SIGKILL)
