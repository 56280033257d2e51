"""The accuracy report against an independent NumPy computation."""

from __future__ import annotations

import numpy as np
import pytest

import cxl_pnm
from reference import exact_topk


def numpy_metrics(keys, values, queries, k):
    """Per head: recall, mass, output error in value-row units, relative error
    over well-conditioned queries (or None), ill-conditioned share."""
    d = keys.shape[-1]
    out = []
    for h in range(keys.shape[1]):
        kh, vh, qh = keys[0, h].astype(np.float64), values[0, h].astype(np.float64), queries[0, h]
        chosen, _ = exact_topk(kh, qh, k)
        scale = np.sqrt((vh**2).sum() / len(vh))
        masses, errors, rels = [], [], []
        for q in qh.astype(np.float64):
            logits = kh @ q / np.sqrt(d)
            w = np.exp(logits - logits.max())
            w /= w.sum()
            full = w @ vh
            ws = w[chosen] / w[chosen].sum()
            err = np.linalg.norm(ws @ vh[chosen] - full)
            masses.append(w[chosen].sum())
            errors.append(err / scale)
            if np.linalg.norm(full) >= 0.1 * scale:
                rels.append(err / np.linalg.norm(full))
        out.append(
            dict(
                mass=np.mean(masses),
                error=np.mean(errors),
                rel=np.mean(rels) if rels else None,
                ill=1 - len(rels) / len(qh),
            )
        )
    return out


def test_report_matches_numpy(tmp_path):
    rng = np.random.default_rng(30)
    keys = rng.standard_normal((1, 2, 2000, 32)).astype(np.float32)
    values = rng.standard_normal((1, 2, 2000, 32)).astype(np.float32)
    # One head with peaked attention (queries along a few keys), one diffuse.
    queries = np.stack(
        [3 * keys[0, 0, [5, 900, 1500]], 0.2 * rng.standard_normal((3, 32))]
    ).astype(np.float32)[None]
    report = cxl_pnm.accuracy.report(
        keys, values, queries, ks=[10, 100], budgets=[], plot_dir=tmp_path, per_head=True
    )
    assert (report["tokens"], report["group"], report["samples"], report["dtype"]) == (2000, 3, 1, "f32")
    for config in report["configs"]:
        assert config["budget"] is None
        want = numpy_metrics(keys, values, queries, config["k"])
        for head, w in zip(config["heads"], want):
            assert head["recall"] == 1.0 and head["keys_read"] == 1.0
            assert head["attention_mass"] == pytest.approx(w["mass"], rel=1e-6)
            assert head["output_error"] == pytest.approx(w["error"], rel=1e-6, abs=1e-12)
            assert head["ill_conditioned"] == pytest.approx(w["ill"])
            if w["rel"] is None:
                assert head["output_rel_error"] is None
            else:
                assert head["output_rel_error"] == pytest.approx(w["rel"], rel=1e-6, abs=1e-12)
        overall = config["overall"]
        assert overall["output_error"] == pytest.approx(np.mean([w["error"] for w in want]), rel=1e-6)
    assert "exact" in report["text"] and "L0 H1" in report["text"]
    written = {p.name for p in tmp_path.iterdir()}
    assert {"accuracy_recall.svg", "accuracy_mass.svg", "accuracy_error.svg", "accuracy_keys_read.svg"} <= written


def test_random_kv_reports_a_meaningful_error_and_no_relative_one():
    report = cxl_pnm.accuracy.synthetic_report(
        "random", layers=1, heads=1, head_dim=64, tokens=4096, ks=[64], budgets=[]
    )
    overall = report["configs"][0]["overall"]
    assert overall["recall"] == 1.0 and overall["ill_conditioned"] == 1.0
    assert overall["output_rel_error"] is None
    assert 0.01 < overall["output_error"] < 1


def test_page_selection_reads_fewer_keys_on_structured_kv(device):
    report = cxl_pnm.accuracy.synthetic_report(
        layers=1, heads=2, tokens=16384, ks=[64], budgets=[4096], samples=2, device=device
    )
    exact, selected = report["configs"]
    assert exact["budget"] is None and selected["budget"] == 4096
    assert exact["overall"]["keys_read"] == 1.0 and selected["overall"]["keys_read"] < 0.5
    assert exact["overall"]["recall"] == 1.0


def test_bad_input_is_refused():
    keys = np.zeros((1, 1, 10, 32), np.float32)
    with pytest.raises(cxl_pnm.InvalidRequestError):
        cxl_pnm.accuracy.report(keys, keys[..., :16])
    with pytest.raises(cxl_pnm.InvalidRequestError):
        cxl_pnm.accuracy.report(keys.view(np.uint16)[..., :32], keys.view(np.uint16)[..., :32])
    with pytest.raises(cxl_pnm.InvalidRequestError):
        cxl_pnm.accuracy.report(keys, keys, np.zeros((1, 1, 2, 16), np.float32))
    with pytest.raises(cxl_pnm.InvalidRequestError):
        cxl_pnm.accuracy.synthetic_report("zipf")
    empty = np.zeros((1, 1, 0, 32), np.float32)  # no tokens: refused, not a crash
    with pytest.raises(cxl_pnm.InvalidRequestError):
        cxl_pnm.accuracy.report(empty, empty)
    with pytest.raises(cxl_pnm.InvalidRequestError):
        cxl_pnm.accuracy.synthetic_report(tokens=0)
