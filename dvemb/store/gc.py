"""``dvemb gc RUN``: delete what a finished run no longer needs — inside the run directory only.

A run is finished when training ended (run.json ``status`` ``trained``) and its scores are written
and intact. Then, without being asked for more, gc drops:

* temporary files an interrupted write left behind (``.NAME.tmp-…``);
* the gradient store and curvature vectors (``grads/seg-*.arrow``, ``grads/curv-seg-*.arrow``) when
  every segment's embeddings and propagator exist and are intact (sha256): the embeddings answer any
  new query (``score.mode=embedding``) and the exact mode needs no gradients.

``drop_grads`` (``--drop-grads``) drops the gradient store and curvature vectors of a run without
embeddings too: afterwards only ``score.mode=exact`` can score it (the default). Checkpoints,
optimizer states, the trajectory, the data, projection.json, scores and curation are always kept.

What was dropped is recorded in run.json (``gc``: relative path -> bytes and why) before anything is
deleted, and the files are removed from manifest.json; :meth:`RunDir.expected` then leaves them out,
and a stage that would read one says it was dropped.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from pathlib import Path

from dvemb.errors import DamagedFileError, DvembError, StoreError
from dvemb.store import integrity
from dvemb.store.rundir import RunDir


class GcRefused(DvembError):
    """The run is not finished, or a file to drop is not inside the run directory."""


def dropped(run: RunDir) -> dict[str, dict]:
    """``{relative path: {"bytes", "why", "at"}}`` of every file gc dropped from ``run``."""
    return dict((run.meta().get("gc") or {}).get("dropped") or {})


def check_not_dropped(run: RunDir, paths: Iterable[Path], stage: str) -> None:
    """StoreError naming the first of ``paths`` that ``dvemb gc`` dropped, and what can still score the run."""
    gone = dropped(run) if run.run_json.exists() else {}
    for p in paths:
        rel = Path(p).absolute().relative_to(run.root).as_posix()
        if rel in gone and not Path(p).exists():
            raise StoreError(
                f"{p}: dropped by `dvemb gc` at {gone[rel].get('at', '?')} ({gone[rel].get('why', '')}); the {stage} "
                "stage needs it — score this run with score.mode=exact (or embedding, if its embeddings were kept)"
            )


def _finished(run: RunDir) -> None:
    meta = run.meta()
    status = meta.get("status", "unknown")
    if status != "trained":
        raise GcRefused(f"{run.root}: status {status!r} — gc only cleans a finished run (status 'trained')")
    try:
        run.require("score")
    except (StoreError, DamagedFileError) as e:
        raise GcRefused(f"{run.root}: the scores are not written or damaged ({e}); score the run before gc") from None


def _inside(run: RunDir, p: Path) -> Path:
    """``p`` (a file of the run) if its folder resolves inside the run directory; else GcRefused."""
    root = run.root.resolve()
    if not p.absolute().parent.resolve().is_relative_to(root) or not p.absolute().is_relative_to(run.root):
        raise GcRefused(f"{p}: resolves outside the run directory {root}; gc deletes nothing outside the run")
    return p


def plan(run: RunDir, drop_grads: bool = False) -> dict[Path, str]:
    """What gc would delete from the finished ``run`` and why (nothing is deleted)."""
    _finished(run)
    out: dict[Path, str] = {p: "temporary file of an interrupted write" for p in integrity.temp_leftovers(run.root)}
    k = len(run.boundaries) - 1
    embedded = [p for j in range(k) for p in (run.embeddings(j), run.propagator(j))]
    vectors = sorted((run.root / "grads").glob("seg-*.arrow")) + sorted((run.root / "grads").glob("curv-seg-*.arrow"))
    if all(p.exists() for p in embedded) and not integrity.damaged(run.root, embedded, deep=True):
        why = "every segment's embeddings are kept: embedding mode re-scores any query without the gradients"
        out.update(dict.fromkeys(vectors, why))
    elif drop_grads:
        out.update(dict.fromkeys(vectors, "--drop-grads: no embeddings kept; only score.mode=exact scores this run"))
    return {_inside(run, p): why for p, why in out.items() if p.is_file() or p.is_symlink()}


def gc(run: RunDir, drop_grads: bool = False, dry_run: bool = False) -> dict[str, dict]:
    """Drop what the finished ``run`` no longer needs; returns ``{relative path: {"bytes", "why", "at"}}``.

    Recorded in run.json first, then forgotten by the manifest, then deleted: an interruption leaves at
    worst a file that is recorded as dropped but still there (gc again removes it).
    """
    todo = plan(run, drop_grads)
    at = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    now = {
        p.relative_to(run.root).as_posix(): {"bytes": p.lstat().st_size, "why": why, "at": at}
        for p, why in todo.items()
    }
    if dry_run or not now:
        return now
    meta = run.meta().get("gc") or {}
    everything = {**(meta.get("dropped") or {}), **now}
    run.update_meta(gc={"dropped": everything, "bytes": sum(e["bytes"] for e in everything.values()), "last": at})
    integrity.forget(todo)
    for p in todo:
        p.unlink(missing_ok=True)
    return now
