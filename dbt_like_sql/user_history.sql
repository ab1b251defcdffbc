-- user_history: per tenant, surface and user, the user's distinct items of the window, most recent first
-- (all of them when max_items is 0, else the max_items most recent).
-- Reads the user_item_daily partitions of the window (weighted interest events of known users only).
--
-- Parameters (SET VARIABLE each one first):
--   paths      the user_item_daily Parquet files of the window's days
--   max_items  items kept per user, 0 = all
--
-- last_ts = the item's latest interest event in the window; weight = the sum of its event weights.
-- Ranked by last_ts desc, then item_id asc (rank 1 = most recent).
WITH items AS (
    SELECT
        tenant, surface, user_id, item_id,
        max(last_ts) AS last_ts,
        -- Summed as fixed-point decimals: exact, so the result does not depend on summation order.
        sum(weight::DECIMAL(18, 6))::DOUBLE AS weight
    FROM read_parquet(getvariable('paths'))
    GROUP BY tenant, surface, user_id, item_id
)

SELECT
    tenant,
    surface,
    user_id,
    row_number() OVER (
        PARTITION BY tenant, surface, user_id ORDER BY last_ts DESC, item_id ASC
    )::INTEGER AS rank,
    item_id,
    last_ts,
    weight
FROM items
QUALIFY getvariable('max_items') = 0 OR rank <= getvariable('max_items')
ORDER BY tenant, surface, user_id, rank;
