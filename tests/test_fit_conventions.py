"""Fit conventions (issue 34 item 15): tokens per parameter at the optimum, what N and C count, attention FLOPs
counted as Chinchilla does (Hoffmann et al. 2022, Appendix F), and G under the compute model the fit used."""

import json
import math

import numpy as np
import pytest

from ar_lm.cli import main, parse
from ar_lm.config import ModelConfig
from ar_lm.errors import UserError
from ar_lm.model.counts import flops_per_token, param_counts
from ar_lm.scaling import ShapeRule
from ar_lm.scaling import compute as CM
from ar_lm.scaling import fit as F
from ar_lm.scaling import parametric as PR
from ar_lm.scaling.points import Points
from ar_lm.scaling.report import format_report

TOP = 16  # approach 3 starts: noise-free laws converge from the best few


def _law(p, n, d):
    return p["E"] + p["A"] / n ** p["alpha"] + p["B"] / d ** p["beta"]


def _chinchilla_20(exponent=0.34, b=400.0):
    """alpha = beta: under C = 6ND, D_opt / N_opt = 1 / G^2 at every C; A chosen so that G^2 = 1/20."""
    return {"E": 1.7, "A": b * 20.0 ** -exponent, "B": b, "alpha": exponent, "beta": exponent}


def _isoflop_points(law, budgets=(1e15, 1e16, 1e17, 1e18), spread=(1 / 6, 10), per=7, fpt=lambda n: 6.0 * n):
    """Sizes around sqrt(C / 120) (20 tokens per parameter), log-spaced over `spread` (not centred on the
    optimum, so the parabola's vertex is not exact by symmetry); D = C / fpt(N), noise-free loss."""
    n, d, c, g = [], [], [], []
    for i, cc in enumerate(budgets):
        for x in math.sqrt(cc / 120) * np.geomspace(*spread, per):
            n.append(x)
            d.append(cc / fpt(x))
            c.append(cc)
            g.append(i)
    n, d, c = (np.array(a) for a in (n, d, c))
    return Points(n, d, c, _law(law, n, d), group=np.array(g))


def _closed_form(p3):
    """G, a, b from the fitted law by hand: G = (alpha A / (beta B))^(1/(alpha+beta)) (Hoffmann et al. eq. 4)."""
    s = p3["alpha"] + p3["beta"]
    return (p3["alpha"] * p3["A"] / (p3["beta"] * p3["B"])) ** (1 / s), p3["beta"] / s, p3["alpha"] / s


# ---------------------------------------------------------------------------------------------
# tokens per parameter


def test_tokens_per_parameter_is_d_opt_over_n_opt_of_the_fitted_law():
    law = _chinchilla_20()
    assert PR.asymptotic_exponents(law)["G"] ** -2 == pytest.approx(20.0, rel=1e-12)  # the law is built for 20
    r = F.fit_points(_isoflop_points(law), n_boot=0, approaches=(2, 3), top=TOP)
    p2, p3, rows = r["approach2"], r["approach3"], r["tokens_per_parameter"]
    g, a, b = _closed_form(p3)
    budgets = sorted(m["C"] for m in p2["minima"])
    assert len(budgets) == 4 and [x["C"] for x in rows] == sorted(budgets + [p3["C_ref"]])
    for row in rows:
        d_over_n = (row["C"] / 6) ** (b - a) / g**2  # D_opt / N_opt = (C/6)^b / G / (G (C/6)^a)
        assert row["approach3"] == pytest.approx(d_over_n, rel=1e-9)
        assert row["approach3"] == pytest.approx(20.0, rel=1e-4)
        if row["at"] == "C_ref":
            assert row["approach2"] is None and row["C"] == p3["C_ref"]
            assert p3["optimum_at_C_ref"]["tokens_per_param"] == pytest.approx(d_over_n, rel=1e-9)
            continue
        m = next(m for m in p2["minima"] if m["C"] == row["C"])
        assert row["approach2"] == m["D_opt"] / m["N_opt"] == m["tokens_per_param"]
        assert row["approach2"] == pytest.approx(20.0, rel=0.05)  # the windowed parabola's vertex, off-centre grid
    line = next(x for x in format_report(r).splitlines() if x.startswith("[fit] tokens per parameter"))
    assert line.count("(approach 2)") == 4 and line.count("(approach 3)") == 5 and "C=1e+16: " in line


def test_tokens_per_parameter_under_the_exact_model_minimises_the_law_at_each_budget():
    """Under an exact model (fpt = 6N + 3e5: an attention-like term) the optimum is numerical; checked
    against a dense scan of L(N, C / fpt(N)) at each budget."""
    law = _chinchilla_20()
    n_grid = np.geomspace(1e5, 1e12, 40)
    compute = CM.ComputeModel("exact", tuple(np.log(n_grid)), tuple(np.log(6 * n_grid + 3e5)))
    pts = _isoflop_points(law, fpt=lambda n: float(compute.fpt(n)))
    pts.compute = compute
    r = F.fit_points(pts, n_boot=0, approaches=(2, 3), top=TOP)
    assert r["approach3"]["compute_model"] == "exact" and r["conventions"]["C"]["compute_model"] == "exact"
    dense = np.geomspace(1e5, 1e11, 400001)
    for row in r["tokens_per_parameter"]:
        loss = _law(r["approach3"], dense, compute.tokens(dense, row["C"]))
        n = dense[np.argmin(loss)]
        assert row["approach3"] == pytest.approx(float(compute.tokens(n, row["C"])) / n, rel=1e-3)
    small = r["tokens_per_parameter"][0]  # the extra term buys fewer tokens than 6ND: below 20 at small C
    assert small["approach3"] < 20 * (1 - 1e-3)


# ---------------------------------------------------------------------------------------------
# attention FLOPs: causal-halved (default) or the full L x L square (Chinchilla)


@pytest.mark.parametrize("cfg", [ModelConfig(family="gpt2", vocab_size=257, d_model=64, n_layers=3, n_heads=4),
                                 ModelConfig(family="llama", vocab_size=300, d_model=96, n_layers=2, n_heads=6,
                                             n_kv_heads=2)])
def test_full_attention_counts_the_whole_square(cfg):
    seq = 128
    d, h_dh = cfg.d_model, cfg.n_heads * cfg.head_dim
    mlp = (2 if cfg.family == "gpt2" else 3) * d * cfg.ff_dim
    matmul = cfg.n_layers * (d * cfg.head_dim * (cfg.n_heads + 2 * cfg.kv_heads) + h_dh * d + mlp) + d * cfg.vocab_size
    causal = 3 * cfg.n_layers * (2 * h_dh + 2 * h_dh) * (seq + 1) / 2  # QK^T + AV, (L+1)/2 keys, fwd + bwd
    full = 3 * cfg.n_layers * (2 * h_dh + 2 * h_dh) * seq  # L keys per query
    assert flops_per_token(cfg, seq) == 6 * matmul + causal  # the default is unchanged
    assert flops_per_token(cfg, seq, causal_halved=False) == 6 * matmul + full
    assert flops_per_token(cfg, seq, causal_halved=False) - flops_per_token(cfg, seq) == full - causal


def _family(n_kind="non_embedding"):
    base = ModelConfig(family="gpt2", vocab_size=257, max_seq_len=64)
    return CM.ShapeFamily(base, ShapeRule(aspect=16, head_dim=16, max_width=256), 128, n_kind)


def _sweep_points(shapes, law=None):
    """Runs on every other shape of the family, two token counts each, C as the runs record it (causal)."""
    law = law or _chinchilla_20()
    models = shapes.shapes()[1::2]
    n = np.array([param_counts(m)[shapes.n_kind] for m in models for _ in (0, 1)], float)
    d = np.array([t * x for x in n[::2] for t in (10.0, 40.0)])
    fpt = np.array([flops_per_token(m, shapes.seq_len) for m in models for _ in (0, 1)])
    curves = [(n[i], fpt[i] * np.array([1e3, 1e4]), np.array([5.0, 4.0])) for i in range(0, len(n), 2)]
    full = np.array([flops_per_token(m, shapes.seq_len, causal_halved=False) for m in models for _ in (0, 1)])
    pts = Points(n, d, fpt * d, _law(law, n, d), curves=curves, compute=CM.measured(n, fpt, shapes),
                 n_kind=shapes.n_kind)
    return pts, full


def test_full_attention_recounts_every_c_from_the_sweeps_shapes():
    shapes = _family()
    pts, full_fpt = _sweep_points(shapes)
    assert pts.compute == CM.analytic(shapes)
    counted = F.with_attention(pts, "full")
    np.testing.assert_allclose(counted.C, full_fpt * pts.D, rtol=1e-12)
    np.testing.assert_allclose(counted.compute.fpt(pts.N), full_fpt, rtol=1e-12)
    for (n, c_t, _), (n0, c0, _) in zip(counted.curves, pts.curves):
        np.testing.assert_allclose(c_t, c0 * float(counted.compute.fpt(n)) / float(pts.compute.fpt(n0)), rtol=1e-12)
    assert np.all(counted.C > pts.C)
    assert F.with_attention(pts, "causal") is pts
    r = json.loads(json.dumps(F.fit_points(pts, n_boot=0, approaches=(3,), top=TOP, attention="full")))
    assert r["conventions"]["C"]["attention"] == "full" and "L x L" in r["conventions"]["C"]["counts"]
    np.testing.assert_allclose([p["C"] for p in r["points"]], full_fpt * pts.D, rtol=1e-12)
    back = CM.ComputeModel.from_json(r["compute"])  # predictions read this: the full-attention model
    np.testing.assert_allclose(back.fpt(pts.N), full_fpt, rtol=1e-12)
    causal = F.fit_points(pts, n_boot=0, approaches=(3,), top=TOP)
    assert causal["conventions"]["C"]["attention"] == "causal"
    assert causal["approach3"]["local"]["a"] != r["approach3"]["local"]["a"]  # under the model actually used


def test_full_attention_needs_the_sweeps_shapes(tmp_path, capsys):
    pts = _isoflop_points(_chinchilla_20())
    with pytest.raises(UserError, match="attention-flops full"):
        F.with_attention(pts, "full")
    with pytest.raises(UserError, match="causal or full"):
        F.with_attention(pts, "halved")
    assert parse(["fit", "--points", "x.csv"]).attention_flops == "causal"
    assert parse(["fit", "--points", "x.csv", "--attention-flops", "full"]).attention_flops == "full"
    csv = tmp_path / "p.csv"
    csv.write_text("params,tokens,loss\n" + "".join(f"{n},{d},{l}\n" for n, d, l in zip(pts.N, pts.D, pts.L)))
    assert main(["fit", "--points", str(csv), "--attention-flops", "full", "--bootstrap", "0"]) == 2
    assert "attention-flops full" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# conventions: what N and C count


def test_conventions_are_recorded_and_the_non_embedding_mismatch_is_named():
    pts, _ = _sweep_points(_family("non_embedding"))
    r = F.fit_points(pts, n_boot=0, approaches=(3,), top=TOP)
    conv = r["conventions"]
    assert conv["N"]["n_kind"] == "non_embedding" and conv["C"]["compute_model"] == "exact"
    assert conv["C"]["output_layer"] is True and conv["C"]["attention"] == "causal"
    assert "non-embedding" in conv["mismatch"] and "6 d V" in conv["mismatch"]
    line = next(x for x in format_report(r).splitlines() if x.startswith("[fit] conventions:"))
    assert "MISMATCH" in line and "causal-halved" in line and "6 d V" in line

    total, _ = _sweep_points(_family("total"))
    conv = F.conventions(total)
    assert conv["N"]["n_kind"] == "total" and conv["C"]["output_layer"] is True and conv["mismatch"] is None

    kaplan = Points(pts.N, pts.D, 6 * pts.N * pts.D, pts.L, n_kind="non_embedding")  # C = 6ND: consistent
    conv = F.conventions(kaplan)
    assert conv["C"]["compute_model"] == "6nd" and conv["C"]["attention"] is None and conv["mismatch"] is None
    assert "MISMATCH" not in "\n".join(format_report({**r, "conventions": conv}).splitlines())

    csv_exact = Points(pts.N, pts.D, pts.C, pts.L, compute=CM.measured(pts.N, pts.C / pts.D))  # a CSV's flops
    assert F.conventions(csv_exact)["C"]["attention"] == "as measured"


# ---------------------------------------------------------------------------------------------
# G and the exponents under the compute model actually used


def test_g_is_the_closed_form_under_6nd_and_named_6nd_equivalent_under_exact():
    law = {"E": 1.8, "A": 400.0, "B": 600.0, "alpha": 0.35, "beta": 0.28}  # alpha != beta: D/N grows with C
    r = F.fit_points(_isoflop_points(law), n_boot=0, approaches=(3,), top=TOP)
    p3 = r["approach3"]
    g, a, b = _closed_form(p3)
    assert p3["compute_model"] == "6nd" and "closed form under this fit's compute model" in p3["G_convention"]
    assert p3["G"] == pytest.approx(g, rel=1e-12) and p3["a"] == pytest.approx(a) and p3["b"] == pytest.approx(b)
    assert p3["G"] == pytest.approx(_closed_form(law)[0], rel=1e-4)  # noise-free: the law's own G
    for c in (1e16, 1e19):  # N_opt = G (C/6)^a is the minimum of L(N, C / 6N): a dense scan
        dense = np.geomspace(1e4, 1e12, 400001)
        n = dense[np.argmin(_law(p3, dense, c / (6 * dense)))]
        assert g * (c / 6) ** a == pytest.approx(n, rel=1e-4)
    assert p3["local"]["a"] == pytest.approx(a, abs=1e-9)  # under 6ND the local exponent is the asymptotic one
    assert any(x.startswith("[fit] approach 3: G = ") for x in format_report(r).splitlines())

    pts, _ = _sweep_points(_family(), law)
    exact = F.fit_points(pts, n_boot=0, approaches=(3,), top=TOP)["approach3"]
    assert exact["compute_model"] == "exact" and "6ND-equivalent" in exact["G_convention"]
    assert abs(exact["local"]["a"] - exact["a"]) > 1e-3  # the exact model's own exponents differ
