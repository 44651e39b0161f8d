"""The docs stay true: the repository is self-contained, and docs/RUN_DIRECTORY.md names every file,
column (with its type), tensor key and JSON field of a real run directory, so the contract cannot
drift silently. docs/DESIGN.md cites only tests that exist."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

from dvemb.cli import app

ROOT = Path(__file__).resolve().parents[1]
RUN_DOC = ROOT / "docs" / "RUN_DIRECTORY.md"
DESIGN_DOC = ROOT / "docs" / "DESIGN.md"
OUTSIDE = "../" + "shared"  # spelled apart so that this file does not match itself
OLD_CITATION = re.compile("DESIGN" + r" §\d")  # "DESIGN §N" of a note outside the repository

# a small run that leaves every optional file too: label noise (corrupted.parquet), true-Fisher curvature
# vectors (grads/curv-*), intermediate checkpoints (value_ckpt_*), two epochs (value_epoch_*)
RUN_SETS = [
    "data.subset=96",
    "train.epochs=2",
    "embed.segments=2",
    "data.label_noise=0.1",
    "embed.curvature=fisher",
    "embed.write=always",  # the embeddings files too (exact mode alone writes none)
]


# ----------------------------------------------------------------------------- self-contained


def tracked_text_files() -> dict[str, str]:
    """Every file git tracks (path -> text); binary files (a NUL byte) are left out."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    names = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    out = {}
    for name in names.decode().split("\0"):
        path = ROOT / name
        if not name or not path.is_file():  # deleted in the working tree
            continue
        data = path.read_bytes()
        if b"\0" not in data:
            out[name] = data.decode("utf-8", errors="replace")
    return out


def test_no_tracked_file_points_outside_the_repository() -> None:
    files = tracked_text_files()
    assert len(files) > 50
    outside = [n for n, text in files.items() if OUTSIDE in text]
    assert not outside, f"these files mention {OUTSIDE}: {outside}"
    cited = [n for n, text in files.items() if OLD_CITATION.search(text)]
    assert not cited, f"these files cite sections of a note outside the repository (use docs/DESIGN.md): {cited}"


def test_design_cites_only_tests_that_exist() -> None:
    cited = set(re.findall(r"(tests/[\w/]+\.py)::(test_\w+)", DESIGN_DOC.read_text()))
    assert len(cited) > 20
    missing = [
        f"{f}::{name}"
        for f, name in sorted(cited)
        if not (ROOT / f).is_file() or not re.search(rf"def {name}\b", (ROOT / f).read_text())
    ]
    assert not missing, f"docs/DESIGN.md cites tests that do not exist: {missing}"


# ----------------------------------------------------------------------------- the run directory


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("docs") / "run"
    cli = CliRunner()
    sets = [a for s in RUN_SETS for a in ("--set", s)]
    res = cli.invoke(app, ["run", "configs/digits_mlp.yaml", "--out", str(out), "--engine", "local", *sets])
    assert res.exit_code == 0, res.output
    res = cli.invoke(app, ["groundtruth", str(out), "--points", "3", "--all-epoch", "2"])
    assert res.exit_code == 0, res.output
    return out


def sections() -> dict[str, str]:
    """RUN_DIRECTORY.md by '## ' heading (the heading's first word, e.g. 'grads/', 'run.json')."""
    parts = re.split(r"^## ", RUN_DOC.read_text(), flags=re.M)
    return {p.split()[0]: p for p in parts[1:]}


def section_of(rel: Path) -> str:
    return rel.parts[0] + "/" if len(rel.parts) > 1 else rel.name


# sections whose files the doc describes by reference: curated.parquet = the training table's columns plus
# prior_value; embeddings files = the layout of the gradient files
ALSO = {"curation/": "data/", "embeddings/": "grads/"}


def template(name: str) -> str:
    """A file name as the doc writes it: step-000030 -> step-XXXXXX, seg-0001 -> seg-XXXX, rank-0 -> rank-R."""
    name = re.sub(r"-\d{6}\.", "-XXXXXX.", name)
    name = re.sub(r"seg-\d{4}", "seg-XXXX", name)
    return re.sub(r"rank-\d+", "rank-R", name)


def column_template(name: str, layers: set[str]) -> str:
    if name in layers:
        return "<layer>"
    name = re.sub(r"^value_epoch_\d+$", "value_epoch_<e>", name)
    return re.sub(r"^value_ckpt_\d+$", "value_ckpt_<b>", name)


def type_tokens(t: pa.DataType) -> list[str]:
    """What a doc line must say about an Arrow type (the doc writes float32 / float64 / list<float64> …)."""
    base = {"int64": "int64", "double": "float64", "float": "float32", "bool": "bool", "string": "str"}
    if pa.types.is_fixed_size_list(t):
        return ["fixed_size_list<", *type_tokens(t.value_type)]
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        return [f"list<{base[str(t.value_type)]}>"]
    return [base.get(str(t), str(t))]


def documented(section: str, name: str, tokens: list[str] = ()) -> bool:
    """A line of ``section`` names `name` (in backticks) together with every token."""
    return any(f"`{name}`" in line and all(tok in line for tok in tokens) for line in section.splitlines())


def test_every_file_is_named(run_dir: Path) -> None:
    doc = RUN_DOC.read_text()
    files = [p for p in run_dir.rglob("*") if p.is_file() and ".tmp-" not in p.name]
    assert len(files) > 25
    missing = sorted({template(p.name) for p in files if template(p.name) not in doc})
    assert not missing, f"docs/RUN_DIRECTORY.md does not name {missing}"


def test_every_column_is_named_with_its_type(run_dir: Path) -> None:
    secs = sections()
    missing = []
    seen = 0
    for path in sorted(run_dir.rglob("*")):
        rel = path.relative_to(run_dir)
        if path.suffix == ".parquet":
            schema, layers = pq.read_schema(path), set()
        elif path.suffix == ".arrow":
            schema = pa.ipc.open_file(pa.memory_map(str(path))).schema
            meta = {k.decode(): v.decode() for k, v in schema.metadata.items()}
            layers = set(json.loads(meta["layers"]))
            for key in meta:
                if not documented(secs["grads/"], key):
                    missing.append(f"{rel}: schema metadata {key}")
        else:
            continue
        sec = secs[section_of(rel)] + secs.get(ALSO.get(section_of(rel), ""), "")
        for field in schema:
            seen += 1
            name = column_template(field.name, layers)
            if not documented(sec, name, type_tokens(field.type)):
                missing.append(f"{rel}: {field.name} {field.type}")
    assert seen > 40
    assert not missing, "docs/RUN_DIRECTORY.md misses (or gives another type for) " + "; ".join(missing)


def json_fields(path: Path) -> list[tuple[str, list[str]]]:
    """(where, field names) of a JSON file's objects that the doc describes field by field."""
    d = json.loads(path.read_text())
    out = [(path.name, list(d))]
    if path.name == "run.json":
        out += [("run.json model_shape", list(d["model_shape"])), ("run.json optimizer", list(d["optimizer"]))]
        out += [("run.json optimizer.groups", list(g)) for g in d["optimizer"]["groups"]]
    elif path.name == "projection.json":
        out += [(f"projection.json layers.{n}", list(v)) for n, v in d["layers"].items()]
    elif path.name == "plan.json":
        out += [("plan.json phases", list(d["phases"]))]
        out += [("plan.json windows", list(w)) for w in d["windows"]]
    elif path.name == "manifest.json":
        out += [("manifest.json files", list(f)) for f in list(d["files"].values())[:1]]
    return out


def test_every_json_field_is_named(run_dir: Path) -> None:
    secs = sections()
    missing = []
    paths = sorted(p for p in run_dir.rglob("*.json"))
    assert {p.name for p in paths} >= {"run.json", "projection.json", "plan.json", "groundtruth.json"}
    for path in paths:
        sec = secs[section_of(path.relative_to(run_dir))]
        for where, fields in json_fields(path):
            missing += [f"{where}: {f}" for f in fields if f"`{f}`" not in sec]
    assert not missing, f"docs/RUN_DIRECTORY.md does not name {missing}"


def test_every_tensor_key_is_named(run_dir: Path) -> None:
    secs = sections()
    missing = []
    for path in sorted(run_dir.rglob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            keys = list(f.keys())
        if path.name.startswith("step-"):
            continue  # the model's own state_dict names
        if path.name.startswith("optimizer-"):
            names = {k.split("::")[1] for k in keys}
        else:  # propagator
            names = {"M.<layer>" if k.startswith("M.") else k for k in keys}
        missing += [f"{path.name}: {n}" for n in names if f"`{n}`" not in secs[section_of(path.relative_to(run_dir))]]
    assert not missing, f"docs/RUN_DIRECTORY.md does not name {missing}"


@pytest.mark.parametrize(
    "make",
    [
        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
        lambda p: torch.optim.AdamW(p, lr=1e-3),
    ],
    ids=["sgd-momentum", "adamw"],
)
def test_optimizer_state_keys_are_named(make) -> None:
    """The state keys of checkpoints/optimizer-*.safetensors for the optimizers a run can use."""
    from dvemb.replay.optim import SEP, torch_state

    model = torch.nn.Linear(3, 2)
    opt = make(model.parameters())
    model(torch.randn(4, 3)).pow(2).sum().backward()
    opt.step()
    keys = torch_state(opt, {id(p): n for n, p in model.named_parameters()})
    assert keys and all(SEP in k for k in keys)
    sec = sections()["checkpoints/"]
    missing = sorted({k.split(SEP)[1] for k in keys} - {n for n in re.findall(r"`(\w+)`", sec)})
    assert not missing, f"docs/RUN_DIRECTORY.md does not name optimizer state keys {missing}"
