-- Rows of one cooc artifact (neighbors.parquet) that break its contract; every row returned is a violation.
-- Parameters (SET VARIABLE each one first): paths (the artifact's neighbors.parquet), min_support (the
-- support it was built with).
-- Problems: null_field, self_neighbor, non_positive_count, below_min_support, bad_score (NaN, infinite or
-- <= 0), duplicate_neighbor, rank_not_sequential (ranks of an item are not exactly 1..n),
-- rank_order (a rank scores higher than the rank before it, or ties are not broken by count, then id).
WITH neighbors AS (
    SELECT
        item_id, rank, neighbor_id, score, count,
        row_number() OVER (PARTITION BY item_id ORDER BY rank, neighbor_id) AS expected_rank,
        count(*) OVER (PARTITION BY item_id, neighbor_id) AS copies,
        lag(score) OVER (PARTITION BY item_id ORDER BY rank, neighbor_id) AS prev_score,
        lag(count) OVER (PARTITION BY item_id ORDER BY rank, neighbor_id) AS prev_count,
        lag(neighbor_id) OVER (PARTITION BY item_id ORDER BY rank, neighbor_id) AS prev_neighbor
    FROM read_parquet(getvariable('paths'))
),

problems AS (
    SELECT
        *,
        CASE
            WHEN item_id IS NULL OR rank IS NULL OR neighbor_id IS NULL OR score IS NULL OR count IS NULL
                THEN 'null_field'
            WHEN item_id = neighbor_id THEN 'self_neighbor'
            WHEN count <= 0 THEN 'non_positive_count'
            WHEN count < getvariable('min_support') THEN 'below_min_support'
            WHEN isnan(score) OR isinf(score) OR score <= 0 THEN 'bad_score'
            WHEN copies > 1 THEN 'duplicate_neighbor'
            WHEN rank <> expected_rank THEN 'rank_not_sequential'
            WHEN prev_score IS NOT NULL AND (
                score > prev_score
                OR (score = prev_score AND count > prev_count)
                OR (score = prev_score AND count = prev_count AND neighbor_id < prev_neighbor)
            ) THEN 'rank_order'
        END AS problem
    FROM neighbors
)

SELECT problem, item_id, rank, neighbor_id, score, count
FROM problems
WHERE problem IS NOT NULL
ORDER BY problem, item_id, rank, neighbor_id;
