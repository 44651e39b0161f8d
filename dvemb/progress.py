"""What ``dvemb run`` shows while it runs, whichever engine drives the stages.

Both engines call :func:`dvemb.pipeline.log_stage` after each stage (and embedding segment); its log
record carries the stage (:func:`stage_extra`). :class:`StageDisplay` is a logging handler on the
``dvemb`` logger that prints one line per finished stage and a spinner on the stage running next
(never during training: Lightning's progress bar has the terminal then). dvemb's other INFO records
update the spinner's text (e.g. the exact sweep's "reverse sweep over 939 steps").

Framework noise: :func:`quiet_frameworks` leaves Lightning one handler (the root's, which shows INFO
only with ``-v``) and filters the known harmless third-party warnings by message.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
import warnings

from rich.console import Console
from rich.markup import escape
from rich.progress import Progress, SpinnerColumn, TaskID, TextColumn, TimeElapsedColumn

STAGES = ("train", "embed", "score", "curate", "report")
NEXT = {"train": "embed", "embed": "score", "score": "curate", "curate": "report"}
STAGE_KEY = "dvemb_stage"  # LogRecord attribute set by stage_extra

# (category, message regex): harmless warnings a run would otherwise print, matched by message only.
KNOWN_WARNINGS = (
    # Lightning 2.6's pytree helper on torch >= 2.10: a deprecation inside Lightning, nothing a user can act on
    (FutureWarning, r"`isinstance\(treespec, LeafSpec\)` is deprecated"),
)
LIGHTNING_LOGGERS = ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning", "lightning_fabric")


_shown = False  # a StageDisplay is attached in this process


def shown() -> bool:
    """A console display is attached in this process (``dvemb run``): show training's own progress bar too."""
    return _shown


def stage_extra(stage: str, segment: int | None = None, segments: int | None = None, wrote: bool = True) -> dict:
    """``extra=`` of a stage's log record: the stage, and for ``embed`` the segment (0-based), the number of
    segments and whether the segment wrote files."""
    return {STAGE_KEY: {"stage": stage, "segment": segment, "segments": segments, "wrote": wrote}}


def quiet_frameworks() -> None:
    """Lightning logs through the root handler only (its own stderr handler printed every line a second
    time) and the known harmless warnings are filtered (by message, nothing else)."""
    for category, message in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    if "lightning" not in sys.modules and "pytorch_lightning" not in sys.modules:
        import lightning  # noqa: F401 - it adds its handler on import: import it now to take that handler off
    for name in LIGHTNING_LOGGERS:
        if name not in logging.root.manager.loggerDict:
            continue
        logger = logging.getLogger(name)
        for h in list(logger.handlers):
            if type(h) is logging.StreamHandler:  # Lightning's own console handler (not a file or API handler)
                logger.removeHandler(h)
        logger.propagate = True


class StageDisplay(logging.Handler):
    """One console line per finished stage and a spinner on the next one (a context manager; attach it to
    the ``dvemb`` logger). Stage records are printed here only: :meth:`not_mine` keeps them off the root
    handler (``-v``), so every record is printed once."""

    def __init__(self, console: Console) -> None:
        super().__init__(logging.INFO)
        self.console = console
        self.start = time.perf_counter()
        self.progress = Progress(
            SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=console, transient=True
        )
        self._lock = threading.Lock()
        self._task: TaskID | None = None
        self._stage: str | None = None
        self._quiet_segments: dict[int, int] = {}  # embed segments that wrote nothing: segment -> of
        self._done_segments: set[int] = set()

    def __enter__(self) -> StageDisplay:
        """Attach to the ``dvemb`` logger (at INFO: the root handler still shows INFO only with ``-v``) and
        keep the stage records off the root handlers."""
        global _shown
        self._logger = logging.getLogger("dvemb")
        self._level = self._logger.level
        if self._logger.getEffectiveLevel() > logging.INFO:
            self._logger.setLevel(logging.INFO)
        self._logger.addHandler(self)
        for h in logging.getLogger().handlers:
            h.addFilter(self.not_mine)
        self.progress.start()
        _shown = True
        return self

    def __exit__(self, *exc) -> None:
        global _shown
        _shown = False
        self.progress.stop()
        self._logger.removeHandler(self)
        self._logger.setLevel(self._level)
        for h in logging.getLogger().handlers:
            h.removeFilter(self.not_mine)

    @staticmethod
    def not_mine(record: logging.LogRecord) -> bool:
        """A logging filter for the other handlers: False for a stage record (the display prints it)."""
        return not hasattr(record, STAGE_KEY)

    def _clock(self) -> str:
        s = int(time.perf_counter() - self.start)
        return f"{s // 60:d}:{s % 60:02d}"

    def _spin(self, stage: str | None, note: str = "") -> None:
        if self._task is not None:
            self.progress.remove_task(self._task)
            self._task = None
        self._stage = stage
        if stage is not None:
            text = f"{stage} …" + (f" {note}" if note else "")
            self._task = self.progress.add_task(escape(text), total=None)

    def _line(self, text: str) -> None:
        self.console.print(f"[dim]{self._clock()}[/] [green]✓[/] {escape(text)}")

    def emit(self, record: logging.LogRecord) -> None:
        try:
            msg = record.getMessage()
            info = getattr(record, STAGE_KEY, None)
            with self._lock:
                if info is None:
                    if self._task is not None:  # what the running stage says it is doing
                        self.progress.update(self._task, description=escape(f"{self._stage} … {msg[:100]}"))
                    return
                stage = info["stage"]
                if stage == "embed" and info["segment"] is not None:
                    self._embed_segment(msg, info)
                    return
                self._flush_embed()
                self._line(msg)
                self._spin(NEXT.get(stage))
        except Exception:  # noqa: BLE001 - a display must never break the run
            self.handleError(record)

    def _embed_segment(self, msg: str, info: dict) -> None:
        j, k = info["segment"], info["segments"] or 1
        self._done_segments.add(j)
        if info["wrote"]:
            self._line(msg)
        else:
            self._quiet_segments[j] = k
        if len(self._done_segments) < k:
            self._spin("embed", f"{len(self._done_segments)}/{k} segments")
        else:
            self._flush_embed()
            self._spin("score")

    def _flush_embed(self) -> None:
        """One line for the embed segments that wrote nothing (exact / direct mode), instead of one each."""
        if self._quiet_segments:
            n, k = len(self._quiet_segments), max(self._quiet_segments.values())
            self._line(f"embed: {n} of {k} segment(s) wrote nothing (the scoring mode needs no embeddings)")
            self._quiet_segments.clear()
