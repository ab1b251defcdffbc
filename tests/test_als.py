"""The `als` artifact: the trainer's matrix and factors, determinism, and the artifact directory it writes."""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

import numpy as np
import polars as pl

from recsys_core.manifest import read_meta, verify_artifact
from recsys_core.settings import AlsConfig
from recsys_dagster.transform.als import interaction_matrix, train_als
from recsys_dagster.transform.artifact_dir import write_artifact_dir

SMALL = AlsConfig(factors=4, iterations=15, regularization=0.1, alpha=5.0)


def two_communities(users_per_side: int = 30, items_per_side: int = 12, seed: int = 3) -> pl.DataFrame:
    """Users u.. interact with about 60% of items a.., users v.. with about 60% of items b.. (seeded)."""
    rng = np.random.default_rng(seed)
    rows = []
    for user_prefix, item_prefix in (("u", "a"), ("v", "b")):
        for u in range(users_per_side):
            for i in range(items_per_side):
                if rng.random() < 0.6:
                    rows.append((f"{user_prefix}{u:02d}", f"{item_prefix}{i:02d}", float(rng.integers(1, 4))))
    schema = {"user_id": pl.String, "item_id": pl.String, "weight": pl.Float64}
    return pl.DataFrame(rows, schema=schema, orient="row")


def test_interaction_matrix_ids_sorted_and_values_by_confidence() -> None:
    rows = pl.DataFrame(
        {"user_id": ["u2", "u1", "u1"], "item_id": ["b", "c", "a"], "weight": [3.0, 1.0, 0.5]}
    )
    users, items, linear = interaction_matrix(rows, "linear")
    assert users == ["u1", "u2"] and items == ["a", "b", "c"]
    assert linear.toarray().tolist() == [[0.5, 0.0, 1.0], [0.0, 3.0, 0.0]]
    _, _, logged = interaction_matrix(rows, "log")
    assert np.allclose(logged.toarray(), np.log1p(linear.toarray()))


def test_train_als_files_shapes_and_alignment() -> None:
    files = train_als(two_communities(), SMALL)
    users = files["users.parquet"]["user_id"].to_list()
    items = files["items.parquet"]["item_id"].to_list()
    assert users == sorted(users) and items == sorted(items) and len(items) == 24
    assert files["user_factors.npy"].shape == (60, 4) and files["user_factors.npy"].dtype == np.float32
    assert files["item_factors.npy"].shape == (24, 4) and files["item_factors.npy"].dtype == np.float32


def test_als_recommends_unseen_items_of_the_users_community() -> None:
    rows = two_communities()
    files = train_als(rows, SMALL)
    users = files["users.parquet"]["user_id"].to_list()
    items = files["items.parquet"]["item_id"].to_list()
    scores = files["user_factors.npy"] @ files["item_factors.npy"].T
    seen = {user: set(group["item_id"]) for (user,), group in rows.group_by("user_id")}
    own = 0
    for row, user in enumerate(users):
        unseen = [items[j] for j in np.argsort(-scores[row], kind="stable") if items[j] not in seen[user]]
        own += unseen[0][0] == ("a" if user.startswith("u") else "b")
    assert own >= 0.95 * len(users)  # a random ranking would get about half


def test_training_is_deterministic_and_emits_no_threading_warning(tmp_path: Path) -> None:
    rows = two_communities()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # implicit warns when BLAS runs multi-threaded under it
        first, second = train_als(rows, SMALL), train_als(rows, SMALL)
    for name in ("user_factors.npy", "item_factors.npy"):
        assert first[name].tobytes() == second[name].tobytes()
    meta = {"tenant": "t", "surface": "s", "params": dataclasses.asdict(SMALL)}
    v1, path = write_artifact_dir(tmp_path, "als", meta, first)
    v2, _ = write_artifact_dir(tmp_path, "als", meta, second)
    assert v1 == v2 and verify_artifact(path, required_nonempty=True) == []
    assert read_meta(path)["rows"] == {
        "items.parquet": 24,
        "users.parquet": 60,
        "item_factors.npy": 24,
        "user_factors.npy": 60,
    }
    other = train_als(rows, dataclasses.replace(SMALL, random_state=7))
    assert write_artifact_dir(tmp_path, "als", meta, other)[0] != v1


def test_a_truncated_factor_file_fails_verification(tmp_path: Path) -> None:
    _, path = write_artifact_dir(tmp_path, "als", {"tenant": "t"}, train_als(two_communities(), SMALL))
    data = (path / "item_factors.npy").read_bytes()
    (path / "item_factors.npy").write_bytes(data[: len(data) // 2])
    assert any("item_factors.npy" in problem for problem in verify_artifact(path, required_nonempty=False))


def test_no_interactions_gives_empty_factors() -> None:
    empty = pl.DataFrame(schema={"user_id": pl.String, "item_id": pl.String, "weight": pl.Float64})
    files = train_als(empty, SMALL)
    assert files["user_factors.npy"].shape == (0, 4) and files["item_factors.npy"].shape == (0, 4)
