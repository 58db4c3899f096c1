"""The streaming Gram kernels against numpy and scikit-learn on materialized trajectories."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file
from sklearn.decomposition import TruncatedSVD

from geobench.linalg import TrajectoryGram, materialize, pca

SHAPES = {"a.weight": (7, 5), "b.weight": (3, 11), "c.bias": (4,)}


def write_trajectory(tmp_path, thetas):
    paths = []
    for t, theta in enumerate(thetas):
        offset, tensors = 0, {}
        for name, shape in SHAPES.items():
            n = int(np.prod(shape))
            tensors[name] = torch.from_numpy(theta[offset:offset + n].reshape(shape).astype(np.float32))
            offset += n
        paths.append(tmp_path / f"step_{t}.safetensors")
        save_file(tensors, paths[-1])
    return paths


D = sum(int(np.prod(s)) for s in SHAPES.values())


def test_gram_equals_materialized_product_for_any_chunking(tmp_path):
    rng = np.random.default_rng(0)
    thetas = rng.normal(size=(6, D)).astype(np.float32)
    paths = write_trajectory(tmp_path, thetas)
    delta = thetas.astype(np.float64) - thetas[0]
    for chunk in (1, 17, 10**6):
        g = TrajectoryGram.build(paths, list(range(6)), list(SHAPES), paths[0], 0, chunk_elements=chunk)
        np.testing.assert_allclose(g.gram, delta @ delta.T, rtol=1e-12, atol=1e-12)
    subset = TrajectoryGram.build(paths, list(range(6)), ["b.weight"], paths[0], 0)
    cols = slice(35, 68)
    np.testing.assert_allclose(subset.gram, delta[:, cols] @ delta[:, cols].T, rtol=1e-12)


def test_pca_matches_numpy_svd_and_sklearn(tmp_path):
    rng = np.random.default_rng(1)
    thetas = np.cumsum(rng.normal(size=(9, D)), axis=0).astype(np.float32)
    paths = write_trajectory(tmp_path, thetas)
    g = TrajectoryGram.build(paths, list(range(9)), list(SHAPES), paths[0], 0)
    rows = thetas.astype(np.float64) - thetas[0]
    result = pca(g, np.eye(9))
    _, s, vt = np.linalg.svd(rows, full_matrices=False)
    np.testing.assert_allclose(result.ratios, (s**2 / (s**2).sum())[: len(result.ratios)], atol=1e-10)
    svd = TruncatedSVD(n_components=5, algorithm="arpack").fit(rows)
    np.testing.assert_allclose(svd.singular_values_, result.sigma[:5], rtol=1e-8)
    v_b = result.directions[0] @ rows
    assert v_b @ rows[-1] > 0  # sign convention: along the final drift
    np.testing.assert_allclose(np.abs(v_b), np.abs(vt[0]), atol=1e-8)
    materialized = materialize(g.names, paths, paths[0], result.directions[0])
    flat = np.concatenate([materialized[n].numpy().ravel() for n in SHAPES])
    np.testing.assert_allclose(flat, v_b, atol=1e-5)

    normalized = pca(g, np.eye(9)[1:], normalize_rows=True)
    unit = rows[1:] / np.linalg.norm(rows[1:], axis=1, keepdims=True)
    s_n = np.linalg.svd(unit, compute_uv=False)
    np.testing.assert_allclose(normalized.ratios, s_n**2 / (s_n**2).sum(), atol=1e-10)


def test_planted_spectrum_gives_known_k95_and_backbone():
    rng = np.random.default_rng(2)
    basis = np.linalg.qr(rng.normal(size=(40, 4)))[0].T  # 4 orthonormal directions in R^40
    scales = np.array([10.0, 3.0, 1.0, 0.5])
    coords = rng.normal(size=(30, 4))
    coords[:, 0] = np.linspace(1, 3, 30)  # a drift along basis[0]
    coords = np.linalg.qr(coords)[0] * scales  # orthogonal columns with planted singular values
    rows = coords @ basis
    g = TrajectoryGram(list(range(30)), ["x"], -1, rows @ rows.T)
    result = pca(g, np.eye(30))
    expected = scales**2 / (scales**2).sum()
    np.testing.assert_allclose(result.ratios, expected, atol=1e-10)
    assert result.k_for(0.95) == int(np.searchsorted(np.cumsum(expected), 0.95) + 1) == 2
    assert result.k_for(0.99) == 3
    v_b = result.directions[0] @ rows
    assert abs(abs(v_b @ basis[0]) - 1) < 1e-10


@settings(max_examples=40, deadline=None)
@given(st.integers(2, 8), st.integers(2, 12), st.integers(0, 2**31 - 1),
       st.lists(st.floats(0.01, 100), min_size=8, max_size=8))
def test_ratios_sum_to_one_and_row_normalization_is_scale_invariant(t, d, seed, scales):
    rows = np.random.default_rng(seed).normal(size=(t, d))
    g = TrajectoryGram(list(range(t)), ["x"], -1, rows @ rows.T)
    result = pca(g, np.eye(t))
    assert result.ratios.sum() == pytest.approx(1.0)
    assert np.all(result.ratios[:-1] >= result.ratios[1:] - 1e-12)
    scaled = rows * np.array(scales[:t])[:, None]
    g2 = TrajectoryGram(list(range(t)), ["x"], -1, scaled @ scaled.T)
    np.testing.assert_allclose(pca(g2, np.eye(t), normalize_rows=True).ratios,
                               pca(g, np.eye(t), normalize_rows=True).ratios, atol=1e-9)
