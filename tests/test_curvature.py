"""True Fisher / GGN curvature vectors: exact vs torch.func, MC unbiasedness, capture during training."""

import importlib.util
import sys
from pathlib import Path

import polars as pl
import pytest
import torch
from torch.func import functional_call, grad, jacrev

from dvemb.capture.fisher import curvature_path, fisher_vectors
from dvemb.capture.hooks import GradientCapture
from dvemb.eval.metrics import spearman
from dvemb.models import MLP, MLPConfig
from dvemb.store.gradstore import read_segment
from dvemb.store.rundir import RunDir, load_tensors
from dvemb.task import masked_cross_entropy
from dvemb.types import ProjectionConfig

F64 = torch.float64


@pytest.fixture
def f64():
    torch.set_default_dtype(F64)
    yield
    torch.set_default_dtype(torch.float32)


def tiny(seed=0):
    torch.manual_seed(seed)
    return MLP(MLPConfig(d_in=5, hidden=(4,), n_classes=3, activation="tanh"))


def flat_layer_grad(g: dict, layer: str) -> torch.Tensor:
    """[d_out, d_in + 1] (bias last) flattened, the store's layout."""
    return torch.cat([g[f"{layer}.weight"], g[f"{layer}.bias"][..., None]], dim=-1).flatten(-2)


def dense(coef: torch.Tensor, vecs: torch.Tensor) -> torch.Tensor:
    return (vecs.T * coef) @ vecs


def test_fisher_vectors_equal_explicit_fisher_and_ggn(f64):
    model = tiny()
    cap = GradientCapture(model, ProjectionConfig(k_a=None, k_s=None, dtype="float64"))
    params = {k: v.detach() for k, v in model.named_parameters()}
    x = torch.randn(1, 5)
    rec = fisher_vectors(model, cap, x, weights=1.0, mode="fisher")
    assert rec.grads["layers.0"].shape == (3, 4 * 6) and rec.sample_ids.tolist() == [0, 0, 0]
    p = torch.softmax(model(x), -1)[0].detach()
    torch.testing.assert_close(rec.weights, p)

    def loss(q, c):
        return masked_cross_entropy(functional_call(model, q, (x,)), torch.tensor([c]))[0]

    for layer in ("layers.0", "layers.2"):
        per_label = torch.stack([flat_layer_grad(grad(loss)(params, c), layer) for c in range(3)])
        torch.testing.assert_close(rec.grads[layer], per_label)  # f_c = grad l(c), not multiplied by w
        fisher = dense(p, per_label)
        torch.testing.assert_close(dense(rec.weights, rec.grads[layer]), fisher)
        # the same matrix is the GGN J^T (diag p - p p^T) J of the layer
        jac = jacrev(lambda q: functional_call(model, {**params, **q}, (x,))[0])(
            {k: v for k, v in params.items() if k.startswith(layer)}
        )
        j = flat_layer_grad(jac, layer)  # [C, D]
        ggn = j.T @ (torch.diag(p) - torch.outer(p, p)) @ j
        torch.testing.assert_close(fisher, ggn)
    assert all(v.grad is None for v in model.parameters())  # never touches .grad


def test_projected_fisher_vectors_use_the_training_projection(f64):
    model = tiny(1)
    cap = GradientCapture(model, ProjectionConfig(k_a=3, k_s=2, dtype="float64"))
    x = torch.randn(4, 5)
    w = torch.full((4,), 0.25)
    rec = fisher_vectors(model, cap, x, weights=w, mode="fisher", sample_ids=[7, 8, 9, 10], step=5)
    assert rec.step == 5 and rec.sample_ids.tolist() == [7] * 3 + [8] * 3 + [9] * 3 + [10] * 3
    params = {k: v.detach() for k, v in model.named_parameters()}
    for z in range(4):
        p = torch.softmax(model(x[z : z + 1]), -1)[0].detach()
        torch.testing.assert_close(rec.weights[3 * z : 3 * z + 3], 0.25 * p)
        for c in range(3):

            def loss(q, z=z, c=c):
                return masked_cross_entropy(functional_call(model, q, (x[z : z + 1],)), torch.tensor([c]))[0]

            g = grad(loss)(params)
            for layer in ("layers.0", "layers.2"):
                want = cap.projectors[layer].project_matrix(
                    flat_layer_grad(g, layer).view(-1, 6 if layer == "layers.0" else 5)
                )
                torch.testing.assert_close(rec.grads[layer][3 * z + c], want)


def test_fisher_vectors_during_capture_leave_the_training_record_alone(f64):
    model = tiny(2)
    cap = GradientCapture(model, ProjectionConfig(k_a=None, k_s=None, dtype="float64"))
    x, y = torch.randn(3, 5), torch.tensor([0, 1, 2])
    with cap.micro_batch([1, 2, 3], weight=1 / 3):
        masked_cross_entropy(model(x), y).mean().backward()
        fisher_vectors(model, cap, x, 1 / 3, mode="fisher")  # inside the open training context
    rec = cap.collect(step=0)
    assert rec.grads["layers.0"].shape[0] == 3
    full = torch.cat([model.layers[0].weight.grad, model.layers[0].bias.grad[:, None]], 1).flatten()
    torch.testing.assert_close(rec.grads["layers.0"].sum(0), full)


def test_fisher_mc_is_unbiased(f64):
    model = tiny(3)
    cap = GradientCapture(model, ProjectionConfig(k_a=None, k_s=None, dtype="float64"))
    x = torch.randn(2, 5)
    exact = fisher_vectors(model, cap, x, 0.5, mode="fisher")
    k = 20000
    mc = fisher_vectors(model, cap, x, 0.5, mode="fisher_mc", k=k, generator=torch.Generator().manual_seed(0))
    assert mc.grads["layers.2"].shape[0] == 2 * k
    torch.testing.assert_close(mc.weights, torch.full((2 * k,), 0.5 / k))
    for layer in ("layers.0", "layers.2"):
        a, b = dense(exact.weights, exact.grads[layer]), dense(mc.weights, mc.grads[layer])
        assert float((a - b).norm() / a.norm()) < 0.03


def test_exact_fisher_refuses_sequences(f64):
    model = torch.nn.Sequential(torch.nn.Linear(4, 6))
    cap = GradientCapture(model, ProjectionConfig(k_a=None, k_s=None, dtype="float64"))
    x = torch.randn(2, 3, 4)
    with pytest.raises(Exception, match="fisher_mc"):
        fisher_vectors(model, cap, x, 0.5, mode="fisher")
    rec = fisher_vectors(model, cap, x, 0.5, mode="fisher_mc", k=2)
    assert rec.grads["0"].shape == (4, 6 * 5)


def test_training_captures_fisher_vectors(tmp_path):
    """Training with embed.curvature=fisher stores C rows per sample per step, formed at theta_t."""
    from dvemb.config import load_config
    from dvemb.embed.run import embed_segment
    from dvemb.score.run import score
    from dvemb.train.run import train

    sets = [
        "data.subset=96",
        "train.epochs=1",
        "train.precision=64-true",
        "capture.dtype=float64",
        "capture.k_a=8",
        "capture.k_s=4",
        "embed.segments=2",
        "embed.curvature=fisher",
        "embed.dtype=float64",
        "score.mode=embedding",
    ]
    cfg = load_config("configs/digits_mlp.yaml", sets)
    run = train(cfg, RunDir(tmp_path / "run"), progress=False)
    b = run.boundaries
    curv = read_segment(curvature_path(run, 0), range(b[0], b[1]), kind="curvature")
    grads = read_segment(run.grads(0), range(b[0], b[1]), kind="grads")
    assert curv[0].grads["layers.0"].shape[0] == 10 * len(grads[0].sample_ids)
    assert torch.equal(curv[0].sample_ids, grads[0].sample_ids.repeat_interleave(10))
    # step 0's vectors are the Fisher vectors at checkpoint 0 on batch 0
    from dvemb.data import TableDataModule
    from dvemb.runtask import model_at

    model = model_at(run, 0)
    cap = GradientCapture(model, ProjectionConfig(k_a=8, k_s=4, dtype="float64"))
    x = TableDataModule(run.data("train"), dtype="float64").get_batch(grads[0].sample_ids.numpy())["x"]
    want = fisher_vectors(model, cap, x, grads[0].weights, mode="fisher")
    torch.testing.assert_close(curv[0].weights, want.weights)
    for n in want.grads:
        torch.testing.assert_close(curv[0].grads[n], want.grads[n])
    assert torch.equal(load_tensors(run.checkpoint(0))["layers.0.weight"], model.layers[0].weight.detach())
    # embed + score (embedding and direct modes agree with the Fisher curvature)
    embed64 = cfg.embed.model_copy(update={"dtype": "float64"})
    for j in range(len(b) - 1):
        embed_segment(run, j, embed64)
    score(run, cfg)
    emb = pl.read_parquet(run.occurrences).filter(pl.col("checkpoint") == b[-1]).sort("step", "sample_id")
    score(run, cfg.model_copy(update={"score": cfg.score.model_copy(update={"mode": "direct"})}))
    direct = pl.read_parquet(run.occurrences).filter(pl.col("checkpoint") == b[-1]).sort("step", "sample_id")
    torch.testing.assert_close(torch.tensor(emb["score"].to_numpy()), torch.tensor(direct["score"].to_numpy()))
    # and they differ from the empirical-Fisher embeddings (the first step of a segment is eta*g either way)
    fisher_emb = [r.grads["layers.0"].clone() for r in read_segment(run.embeddings(0), range(b[0], b[1]))]
    embed_segment(run, 0, embed64.model_copy(update={"curvature": "empirical"}))
    emp_emb = [r.grads["layers.0"] for r in read_segment(run.embeddings(0), range(b[0], b[1]))]
    assert not torch.allclose(fisher_emb[0], emp_emb[0])
    torch.testing.assert_close(fisher_emb[-1], emp_emb[-1])


BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_fidelity.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_fidelity_for_tests", BENCH)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
def test_curvature_options_on_the_long_regime():
    """10 epochs, lr 0.2, unprojected, 320 last-epoch occurrences vs exact TSLOO (~35 s and ~2 GB of stored
    float64 Fisher vectors: a real recorded run since bench_fidelity drives dvemb's own training).

    Measured (docs/RESULTS.md, deterministic fp64): Spearman DVEmb-fisher with one curvature block
    0.963 (the issue's target is 0.95), per-layer 0.86, DVEmb-empirical 0.69, grad-dot 0.58.
    """
    bf = load_bench()
    names = ("DVEmb-empirical", "DVEmb-fisher", "DVEmb-fisher-model", "grad-dot")
    torch.set_default_dtype(torch.float64)
    try:
        epochs, lr = bf.DATASETS["digits"].regimes["long"]
        exp = bf.train(epochs, lr)
        pick, ts, _, _, _, _ = bf.ground_truth(exp, 320, 0)
        est = bf.estimates(exp, None, None, which=names)
        rows = torch.tensor([t * bf.B + p for t, p in pick])
        rho = {k: spearman(est[k][rows], ts) for k in names}
        print("Spearman vs TSLOO (long regime):", {k: round(v, 3) for k, v in rho.items()})
        assert rho["DVEmb-fisher-model"] >= 0.95
        assert rho["DVEmb-fisher"] > rho["DVEmb-empirical"] + 0.1
        assert rho["DVEmb-empirical"] > rho["grad-dot"] + 0.05
    finally:
        torch.set_default_dtype(torch.float32)
