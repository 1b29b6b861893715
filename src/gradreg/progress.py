"""The one progress bar: a tqdm bar on stderr, shown on a terminal by default and never written
into a log file or a pipe. The judge (images scored) and the training loop (steps of an epoch)
both draw theirs here."""
from __future__ import annotations

import sys
from typing import Any


def progress_bar(*, total: int, desc: str, show: bool | None = None, initial: int = 0, unit: str = "it") -> Any:
    """A context-manager bar counting to ``total`` from ``initial``; ``show`` None: only when
    stderr is a terminal, True/False: always/never. ``leave=False``: a finished bar disappears,
    so a run's output keeps only what it reports (our choice)."""
    from tqdm.auto import tqdm  # lazy: importing gradreg does not import tqdm

    visible = sys.stderr.isatty() if show is None else show
    return tqdm(total=total, initial=initial, desc=desc, unit=unit, disable=not visible, leave=False,
                dynamic_ncols=True)
