"""``embed.curvature: hessian``: the exact Hessian of each step in the store's coordinates; clipping's derivative.

Independent checks: the store's transposed map is the adjoint of capture's map (every store kind); the product
equals ``S H S^T x`` with H the dense Hessian of the step's batch loss (torch.autograd.functional.hessian) at the
replayed parameters, for a compressed store and both block layouts; and on an unprojected store with one block,
the SGD, momentum and Adam-aware recursions (direct and embedding modes) give the exact mode's first-order sweep
(dvemb.replay.exact, ``removal="linear"``: the VJP of the real optimizer's step map) to float64 rounding — on runs
where global-norm clipping scales some steps, so clipping's derivative ``c (I - u u^T)`` is checked too; on a
sampled store with clipped steps, embeddings give the direct scores. A run
whose replay misses its recorded boundary is refused with the step, before any score is written.
"""

from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from dvemb.capture.hooks import GradientCapture
from dvemb.cli import app
from dvemb.embed.adam import StoredCoordinates
from dvemb.embed.blocks import MODEL
from dvemb.embed.hessian import StoredHessian
from dvemb.embed.run import embed_segment
from dvemb.replay.exact import exact_scores
from dvemb.replay.trajectory import load_trajectory
from dvemb.runtask import run_config
from dvemb.score.run import occurrence_scores
from dvemb.store.gradstore import read_projection
from dvemb.store.rundir import RunDir
from dvemb.types import ProjectionConfig

FP64 = ["train.precision=64-true", "capture.dtype=float64", "embed.dtype=float64"]
# clipping at 0.6 scales some steps and not others: both sides of clipping's derivative (dvemb.embed.clipping)
TINY = ["train.epochs=2", "data.subset=160", "data.eval_subset=64", "embed.segments=2", "train.grad_clip=0.6", *FP64]
FULL = ["capture.k_a=null", "capture.k_s=null", "capture.kind=kronecker"]
OPTIMIZERS = {
    "sgd": ["train.lr=0.1"],
    "momentum": ["train.momentum=0.9", "train.lr=0.05"],
    "adamw": ["train.optimizer=adamw", "train.lr=0.01", "train.weight_decay=0.01"],
}


@pytest.fixture(scope="module")
def runs(cli_run, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hessian")
    out = {k: cli_run(root / k, TINY + FULL + sets) for k, sets in OPTIMIZERS.items()}
    out["rowwise"] = cli_run(root / "rowwise", TINY + OPTIMIZERS["adamw"] + ["capture.kind=rowwise", "capture.k_a=8"])
    return out


@pytest.mark.parametrize("kind", ["rowwise", "subsample", "kronecker"])
def test_the_transposed_store_map_is_the_adjoint_of_the_store_map(kind):
    """<S a, x> == <a, S^T x> for parameter-shaped a and stored-coordinate x, every store kind (1e-12)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3, bias=False)).double()
    cap = GradientCapture(model, ProjectionConfig(k_a=3, k_s=2, kind=kind, dtype="float64"))
    coords = StoredCoordinates(model, cap.specs, torch.float64)
    params = dict(model.named_parameters())
    a = {p: torch.randn(4, *x.shape, dtype=torch.float64) for p, x in params.items()}
    x = {n: torch.randn(4, s.dim, dtype=torch.float64) for n, s in cap.specs.items()}
    sa = coords.to_stored(lambda p: a[p])
    stx = coords.from_stored(x)
    lhs = sum((sa[n] * x[n]).sum(1) for n in x)
    rhs = sum((a[p] * stx[p]).flatten(1).sum(1) for p in params)
    torch.testing.assert_close(lhs, rhs, rtol=1e-12, atol=1e-12)


def test_the_product_is_the_dense_hessian_seen_through_the_store(runs):
    """On a rowwise store: product(x) == S H_t S^T x with H_t the dense Hessian of the step's batch loss at the
    replayed theta_t; ``model`` applies all of it, per-layer keys its diagonal blocks."""
    run = RunDir(runs["rowwise"])
    traj = load_trajectory(run)
    coords = StoredCoordinates(traj.net.model, read_projection(run.projection), traj.dtype)
    hess = StoredHessian(traj, coords)
    t = traj.boundaries[1] + 2  # inside the second segment: replayed from its boundary
    theta = hess.theta(t)
    names = hess.params
    shapes = [theta[p].shape for p in names]
    sizes = [theta[p].numel() for p in names]

    def loss(flat: torch.Tensor) -> torch.Tensor:
        parts = dict(zip(names, (v.reshape(s) for v, s in zip(flat.split(sizes), shapes))))
        return traj.batch_loss(theta | parts, t)

    dense = torch.autograd.functional.hessian(loss, torch.cat([theta[p].flatten() for p in names]))
    eye = torch.eye(sum(sizes), dtype=torch.float64)
    basis = {p: eye[:, sum(sizes[:i]) : sum(sizes[: i + 1])].reshape(-1, *shapes[i]) for i, p in enumerate(names)}
    cols = coords.to_stored(lambda p: basis[p])  # layer -> [P, K_l]
    s = torch.cat([cols[n] for n in hess.layers], 1).T  # [K, P]: the store's map as a matrix
    h = s @ dense @ s.T
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(len(h), 3, generator=gen, dtype=torch.float64)
    got = hess.product(t, {MODEL: x})[MODEL]
    torch.testing.assert_close(got, h @ x, rtol=1e-10, atol=1e-12)
    dims = [hess.dims[n] for n in hess.layers]
    xs = dict(zip(hess.layers, x.split(dims)))
    per_layer = hess.product(t, xs)
    for i, n in enumerate(hess.layers):
        sl = slice(sum(dims[:i]), sum(dims[: i + 1]))
        torch.testing.assert_close(per_layer[n], h[sl, sl] @ xs[n], rtol=1e-10, atol=1e-12)


def _scores(run: RunDir, mode: str, blocks: str, curvature: str = "hessian") -> np.ndarray:
    """Occurrence scores at the final checkpoint, in (step, sample id) order."""
    cfg = run_config(run).model_copy(deep=True)
    cfg.embed.curvature, cfg.embed.blocks, cfg.score.mode, cfg.score.checkpoints = curvature, blocks, mode, False
    if mode == "embedding":
        for j in range(len(run.boundaries) - 1):
            embed_segment(run, j, cfg.embed, "embedding")
    return occurrence_scores(run, cfg).sort("step", "sample_id")["score"].to_numpy()


def test_the_runs_clip_some_steps_and_not_others(runs):
    from dvemb.store.trajectory import read_steps

    for run in runs.values():
        clip = read_steps(RunDir(run))["clip_factor"].to_numpy()
        assert (clip < 1).any() and (clip == 1).any(), clip


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
def test_with_the_hessian_the_recursions_are_the_exact_first_order_sweep(runs, optimizer):
    """Unprojected, one block, clipped steps among them: direct and embedding modes == exact mode with the removal
    linearised (1e-10 of the largest score) — clipping's derivative included; per-layer blocks: embedding ==
    direct."""
    run = RunDir(runs[optimizer])
    traj = load_trajectory(run)
    sweep = exact_scores(traj, removal="linear")[traj.boundaries[-1]]
    ids = np.concatenate([s.sample_ids.numpy() for s in traj.steps])
    steps = np.repeat(np.arange(traj.num_steps), [len(s.sample_ids) for s in traj.steps])
    want = torch.cat(sweep).numpy()[np.lexsort((ids, steps))]
    scale = np.abs(want).max()
    for mode in ("direct", "embedding"):
        np.testing.assert_allclose(_scores(run, mode, "model"), want, rtol=0, atol=1e-10 * scale)
    np.testing.assert_allclose(_scores(run, "embedding", "layer"), _scores(run, "direct", "layer"), atol=1e-10 * scale)


@pytest.mark.parametrize("curvature, blocks", [("empirical", "layer"), ("hessian", "model")])
def test_clipped_embeddings_give_the_direct_scores_on_a_sampled_store(runs, curvature, blocks):
    """A rowwise store (sampling ratio rho != 1) with clipped steps: embedding mode == direct mode (1e-10)."""
    run = RunDir(runs["rowwise"])
    direct = _scores(run, "direct", blocks, curvature)
    embedded = _scores(run, "embedding", blocks, curvature)
    np.testing.assert_allclose(embedded, direct, rtol=0, atol=1e-10 * np.abs(direct).max())


def test_embedding_mode_answers_from_the_embeddings_as_built_and_says_so(runs, caplog):
    """Embeddings built with the Hessian over the model, then queried with other embed settings: the scores are the
    embeddings' (the Hessian's), and a warning names both settings and how to re-embed; the same settings: none."""
    run = RunDir(runs["rowwise"])
    built = _scores(run, "embedding", "model", "hessian")
    cfg = run_config(run).model_copy(deep=True)
    cfg.score.mode, cfg.score.checkpoints = "embedding", False
    cfg.embed.curvature, cfg.embed.blocks = "empirical", "layer"
    with caplog.at_level("WARNING"):
        got = occurrence_scores(run, cfg).sort("step", "sample_id")["score"].to_numpy()
    np.testing.assert_array_equal(got, built)
    text = " ".join(caplog.text.split())
    assert "built with embed.curvature=hessian, embed.blocks=model" in text, text
    assert "--set embed.curvature=empirical --set embed.blocks=layer" in text, text
    assert "embed.curvature=empirical, embed.blocks=layer; the adamw-aware" not in text  # advice follows the build
    caplog.clear()
    cfg.embed.curvature, cfg.embed.blocks = "hessian", "model"
    with caplog.at_level("WARNING"):
        occurrence_scores(run, cfg)
    assert "built with" not in caplog.text


def test_a_run_whose_replay_misses_its_boundary_is_refused_with_the_step(runs, tmp_path):
    """A tampered boundary checkpoint: `dvemb score` with the Hessian curvature exits 2 saying the replay misses the
    recorded state at a step, with no traceback, and writes no scores."""
    import shutil

    from dvemb.store.rundir import load_tensors, save_tensors

    run = RunDir(shutil.copytree(runs["sgd"], tmp_path / "run"))
    run.occurrences.unlink(missing_ok=True)
    b = run.boundaries[1]
    state = load_tensors(run.checkpoint(b))
    w = state["layers.0.weight"]
    state["layers.0.weight"] = w + 0.2 * w.abs().max()
    save_tensors(run.checkpoint(b), state)
    sets = ["score.mode=direct", "embed.curvature=hessian"]
    res = CliRunner().invoke(app, ["score", str(run.root), *(a for x in sets for a in ("--set", x))])
    text = " ".join(res.output.split())
    assert res.exit_code == 2, text
    assert "misses the recorded state at step" in text and "no scores written" in text, text
    assert "Traceback" not in text and not run.occurrences.exists()
