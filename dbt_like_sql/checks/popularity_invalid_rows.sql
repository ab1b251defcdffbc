-- Rows of one popularity artifact (items.parquet) that break its contract; every row returned is a violation.
-- Parameters (SET VARIABLE each one first): paths (the artifact's items.parquet).
-- Problems: null_field, duplicate_item, rank_not_sequential (ranks are not exactly 1..n),
-- bad_score (negative, NaN or infinite), non_positive_events, rank_order (a rank scores higher than the
-- rank before it; equal scores are ranked by reach, which this file does not hold, so any order of them
-- passes).
WITH items AS (
    SELECT
        rank, item_id, score, events,
        row_number() OVER (ORDER BY rank, item_id) AS expected_rank,
        count(*) OVER (PARTITION BY item_id) AS copies,
        lag(score) OVER (ORDER BY rank, item_id) AS prev_score
    FROM read_parquet(getvariable('paths'))
),

problems AS (
    SELECT
        *,
        CASE
            WHEN rank IS NULL OR item_id IS NULL OR score IS NULL OR events IS NULL THEN 'null_field'
            WHEN copies > 1 THEN 'duplicate_item'
            WHEN rank <> expected_rank THEN 'rank_not_sequential'
            WHEN score < 0 OR isnan(score) OR isinf(score) THEN 'bad_score'
            WHEN events <= 0 THEN 'non_positive_events'
            WHEN prev_score IS NOT NULL AND score > prev_score THEN 'rank_order'
        END AS problem
    FROM items
)

SELECT problem, rank, item_id, score, events
FROM problems
WHERE problem IS NOT NULL
ORDER BY problem, rank, item_id;
