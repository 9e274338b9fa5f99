"""Progress bars that read well in a terminal and in a log file.

On a terminal `bar` is tqdm's bar, redrawn in place. When stderr is not a terminal (a batch
job's log, `2> train.log`) tqdm's carriage returns would pile up into one unreadable line, so
the same bar is written as plain lines, one at most every LOG_INTERVAL_S seconds (and one at
the start and the end), each a full line of text.
"""

from __future__ import annotations

import sys

from tqdm import tqdm

LOG_INTERVAL_S = 30.0
LOG_FORMAT = "{desc}: {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}{postfix}]"


class _Lines:
    """A file for tqdm that turns each redraw ('\\r' + text) into one line of `stream`."""

    def __init__(self, stream) -> None:
        self.stream = stream

    def write(self, text: str) -> None:
        line = text.replace("\r", "").rstrip()
        if line:
            self.stream.write(line + "\n")

    def flush(self) -> None:
        self.stream.flush()


def is_terminal(stream=None) -> bool:
    stream = sys.stderr if stream is None else stream
    return bool(getattr(stream, "isatty", lambda: False)())


def bar(iterable=None, **kwargs) -> tqdm:
    """tqdm(iterable, **kwargs) on a terminal; in a log, lines every LOG_INTERVAL_S."""
    if kwargs.get("disable") or is_terminal(kwargs.get("file")):
        return tqdm(iterable, **kwargs)
    stream = kwargs.pop("file", None) or sys.stderr
    kwargs.pop("dynamic_ncols", None)
    return tqdm(iterable, file=_Lines(stream), mininterval=LOG_INTERVAL_S, maxinterval=1e9,
                bar_format=LOG_FORMAT, **{"leave": True, **kwargs})
