"""Published curated datasets: numbered, immutable versions that a next run or a retraining reads.

``DATASETS/<name>/v0001/``::

  curated.parquet   the source run's curation/curated.parquet (kept rows, most valuable first)
  plan.json         its selection plan (phases, windows, filter outcome)
  manifest.json     name, version, rows, sha256 and bytes of both files, the source run (path, resolved
                    config, sha256 of its training/validation tables, flow run) and when it was published

A version is built in a hidden temporary folder and renamed into place, so it is complete or absent;
an existing version is never written to again (``os.rename`` refuses a non-empty target, and the next
number is tried). Its files are made read-only.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from dvemb.config import RunConfig
from dvemb.curate.retrain import Variant, fit_variant, write_comparison
from dvemb.curate.run import read_plan
from dvemb.errors import DataError, StoreError
from dvemb.store.rundir import RunDir

VERSION = re.compile(r"^v(\d{4,})$")
FILES = ("curated.parquet", "plan.json")
RANDOM_SEED_SALT = 0x5EED


def sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def versions(root: str | Path, name: str) -> list[Path]:
    """Published (complete) versions of dataset ``name`` under ``root``, oldest first."""
    base = Path(root) / name
    if not base.is_dir():
        return []
    found = [p for p in base.iterdir() if VERSION.match(p.name) and (p / "manifest.json").is_file()]
    return sorted(found, key=lambda p: int(p.name[1:]))


def _next_number(base: Path) -> int:
    taken = [int(m.group(1)) for p in base.iterdir() if (m := VERSION.match(p.name))]
    return max(taken, default=0) + 1


def publish_version(run: RunDir, root: str | Path, name: str | None = None, source: dict | None = None) -> Path:
    """Publish ``run``'s curated table and plan as the next version of dataset ``name`` (default: the
    run's config name) under ``root``; returns the version folder. ``source``: extra provenance
    recorded in the manifest (e.g. the flow run id, the config file and overrides)."""
    run.require("curate")
    meta = run.meta()
    name = name or meta["config"]["name"]
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        raise DataError(f"dataset name {name!r}: use letters, digits, '_', '.', '-' (it names a folder)")
    base = Path(root).expanduser().resolve() / name
    base.mkdir(parents=True, exist_ok=True)
    src_files = {"curated.parquet": run.curated, "plan.json": run.plan}
    tables = {s: run.data(s) for s in ("train", "val", "test") if run.data(s).exists()}
    tmp = Path(tempfile.mkdtemp(prefix=".publishing-", dir=base))
    try:
        files = {}
        for fname, src in src_files.items():
            shutil.copyfile(src, tmp / fname)
            files[fname] = {"sha256": sha256(tmp / fname), "bytes": (tmp / fname).stat().st_size}
        plan = json.loads((tmp / "plan.json").read_text())
        manifest = {
            "name": name,
            "version": None,
            "published": datetime.now(UTC).isoformat(timespec="seconds"),
            "rows": pq.read_metadata(tmp / "curated.parquet").num_rows,
            "files": files,
            "curation": {k: plan.get(k) for k in ("n_train", "n_kept", "n_dropped", "order", "phases", "policy")},
            "source": {
                "run": str(run.root),
                "tables": {s: {"path": str(p), "sha256": sha256(p)} for s, p in tables.items()},
                "config": meta["config"],
                **(source or {}),
            },
        }
        while True:
            version = f"v{_next_number(base):04d}"
            manifest["version"] = version
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
            for f in (*FILES, "manifest.json"):
                os.chmod(tmp / f, 0o444)
            try:
                os.rename(tmp, base / version)
            except OSError:
                if not (base / version).exists():
                    raise
                os.chmod(tmp / "manifest.json", 0o644)  # another publisher took the number: try the next
                continue
            return base / version
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_version(path: str | Path, verify: bool = True) -> tuple[Path, dict]:
    """A version folder (or its manifest.json) -> (folder, manifest); checks every file's sha256."""
    folder = Path(path).expanduser().resolve()
    if folder.name == "manifest.json":
        folder = folder.parent
    manifest_path = folder / "manifest.json"
    if not manifest_path.is_file():
        raise StoreError(f"dataset {str(path)!r}: no manifest.json — not a published dataset version")
    manifest = json.loads(manifest_path.read_text())
    if verify:
        for fname, entry in manifest["files"].items():
            if not (folder / fname).is_file() or sha256(folder / fname) != entry["sha256"]:
                raise StoreError(f"{folder / fname}: missing or differs from its sha256 in {manifest_path}")
    return folder, manifest


def source_run(manifest: dict) -> RunDir:
    """The run a version was curated from; DataError when its tables changed since publication."""
    run = RunDir(manifest["source"]["run"])
    for split, entry in manifest["source"].get("tables", {}).items():
        p = Path(entry["path"])
        if not p.is_file() or sha256(p) != entry["sha256"]:
            raise DataError(f"{p}: the {split} table of the source run is missing or changed since publication")
    return run


def random_subset(table: str | Path, rows: int, seed: int) -> pa.Table:
    """``rows`` rows of ``table`` drawn uniformly without replacement (seeded), in table order."""
    t = pq.read_table(table)
    idx = np.sort(np.random.default_rng([seed, RANDOM_SEED_SALT]).permutation(t.num_rows)[:rows])
    return t.take(pa.array(idx))


VARIANTS = ("full", "curated", "random")


def variant(folder: Path, manifest: dict, name: str, seed: int) -> Variant:
    """One retraining variant of a published version (see :func:`retrain_version`)."""
    run = RunDir(manifest["source"]["run"])
    if name == "full":
        return Variant("full", run.data("train"))
    if name == "curated":
        return Variant("curated", folder / "curated.parquet", read_plan(folder / "plan.json"))
    if name == "random":
        return Variant("random", random_subset(run.data("train"), manifest["rows"], seed))
    raise ValueError(f"variant {name!r}: choose one of {VARIANTS}")


def fit(folder: Path, manifest: dict, name: str, seed: int, out: str | Path) -> dict:
    """Fit variant ``name`` with ``seed`` into ``<out>/<name>/seed-<seed>``; its metrics row."""
    cfg = RunConfig.model_validate(manifest["source"]["config"])
    run = RunDir(manifest["source"]["run"])
    return fit_variant(run, cfg, variant(folder, manifest, name, seed), seed, Path(out) / name / f"seed-{seed}")


def retrain_version(
    version: str | Path, seeds: list[int] | tuple[int, ...] = (0, 1, 2), out: str | Path | None = None
) -> tuple[pl.DataFrame, dict]:
    """Retrain on a published version and compare, seed for seed, on the source run's validation/test sets:

    * ``full``: every training row of the source run, uniform batches;
    * ``curated``: the version's curated rows with its plan;
    * ``random``: as many rows as ``curated``, drawn uniformly (per seed) from the full table — the same
      budget of rows and steps, so a gap to ``curated`` is the effect of which rows were kept.

    Same model config, epochs and batch size throughout. Writes ``<out>/comparison.{parquet,json}``
    (default out: ``<dataset>/retrain/<version>``) and returns (summary table, manifest).
    """
    folder, manifest = read_version(version)
    source_run(manifest)
    out = Path(out) if out is not None else folder.parent / "retrain" / folder.name
    rows = [fit(folder, manifest, v, s, out) for s in seeds for v in VARIANTS]
    return write_comparison(rows, out), manifest


def comparison_markdown(summary: pl.DataFrame, manifest: dict) -> str:
    """The comparison in words: each variant's mean test (else validation) accuracy and loss, and
    curated minus random / minus full."""
    split = "test" if "test_acc_mean" in summary.columns else "val"
    rows = {r["variant"]: r for r in summary.to_dicts()}
    lines = [
        f"# Retraining on `{manifest['name']}` {manifest['version']}",
        "",
        f"Curated rows: **{manifest['rows']}** (kept {manifest['curation']['n_kept']} of "
        f"{manifest['curation']['n_train']}); source run `{manifest['source']['run']}`.",
        "`random` trains on as many rows as `curated`, drawn uniformly: same rows, steps, epochs and seeds.",
        "",
        f"| variant | train rows | seeds | {split} accuracy | {split} loss |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, r in rows.items():
        lines.append(
            f"| {name} | {r['n_train']} | {r['seeds']} | {r[f'{split}_acc_mean']:.4f} ± {r[f'{split}_acc_sd']:.4f} "
            f"| {r[f'{split}_loss_mean']:.4f} ± {r[f'{split}_loss_sd']:.4f} |"
        )
    if "curated" in rows:
        c = rows["curated"]
        lines.append("")
        for other in ("random", "full"):
            if other in rows:
                o = rows[other]
                lines.append(
                    f"- curated − {other}: {split} accuracy {c[f'{split}_acc_mean'] - o[f'{split}_acc_mean']:+.4f}, "
                    f"{split} loss {c[f'{split}_loss_mean'] - o[f'{split}_loss_mean']:+.4f}"
                )
    return "\n".join(lines) + "\n"
