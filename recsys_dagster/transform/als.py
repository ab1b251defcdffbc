"""The `als` artifact's trainer: implicit-feedback ALS (the `implicit` library) on one tenant and surface.

Input: the rows of `dbt_like_sql/als_interactions.sql` for one tenant and surface (user_id, item_id,
weight: the window's decayed, event-type-weighted interactions). Output: the artifact's files, users and
items sorted by id, row i of a factor array belonging to row i of its id table.

Confidence: the matrix value of (u, i) is the weight ("linear") or log(1 + weight) ("log"); implicit scales
it by `alpha`. Deterministic: CPU ALS with a fixed `random_state` gives the same factors bit for bit on any
number of threads, so the same input and parameters give the same files and version. BLAS is held to one
thread around the fit (implicit parallelises over users itself; a multi-threaded BLAS underneath would
oversubscribe the cores, and implicit warns about it).
"""

from __future__ import annotations

import numpy as np
import polars as pl
import scipy.sparse as sp
from threadpoolctl import threadpool_limits

from recsys_core.settings import AlsConfig


def interaction_matrix(rows: pl.DataFrame, confidence: str) -> tuple[list[str], list[str], sp.csr_matrix]:
    """(users sorted, items sorted, users x items CSR of confidence values) from interaction rows."""
    users = rows.get_column("user_id").unique().sort()
    items = rows.get_column("item_id").unique().sort()
    user_codes = rows.get_column("user_id").cast(pl.Enum(users)).to_physical().to_numpy()
    item_codes = rows.get_column("item_id").cast(pl.Enum(items)).to_physical().to_numpy()
    weights = rows.get_column("weight").to_numpy().astype(np.float64)
    values = np.log1p(weights) if confidence == "log" else weights
    matrix = sp.csr_matrix(
        (values.astype(np.float32), (user_codes, item_codes)),
        shape=(len(users), len(items)),
        dtype=np.float32,
    )
    matrix.sum_duplicates()
    matrix.sort_indices()
    return users.to_list(), items.to_list(), matrix


def fit_factors(matrix: sp.csr_matrix, config: AlsConfig) -> tuple[np.ndarray, np.ndarray]:
    """(user factors, item factors) as float32 arrays; zero-row arrays for an empty matrix."""
    if matrix.nnz == 0:
        n_users, n_items = matrix.shape
        return (
            np.zeros((n_users, config.factors), dtype=np.float32),
            np.zeros((n_items, config.factors), dtype=np.float32),
        )
    from implicit.cpu.als import AlternatingLeastSquares  # about half a second to import: only when training

    with threadpool_limits(1, "blas"):
        model = AlternatingLeastSquares(
            factors=config.factors,
            regularization=config.regularization,
            alpha=config.alpha,
            iterations=config.iterations,
            random_state=config.random_state,
            calculate_training_loss=False,
            num_threads=0,
        )
        model.fit(matrix, show_progress=False)
    return (
        np.asarray(model.user_factors, dtype=np.float32),
        np.asarray(model.item_factors, dtype=np.float32),
    )


def train_als(rows: pl.DataFrame, config: AlsConfig) -> dict[str, pl.DataFrame | np.ndarray]:
    """The `als` artifact's files for one tenant and surface."""
    users, items, matrix = interaction_matrix(rows, config.confidence)
    user_factors, item_factors = fit_factors(matrix, config)
    return {
        "items.parquet": pl.DataFrame({"item_id": pl.Series(items, dtype=pl.String)}),
        "users.parquet": pl.DataFrame({"user_id": pl.Series(users, dtype=pl.String)}),
        "user_factors.npy": user_factors,
        "item_factors.npy": item_factors,
    }
