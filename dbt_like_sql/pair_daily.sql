-- pair_daily: per tenant and surface, how many of the day's sessions contain each pair of items.
-- Input to the `cooc` window artifact, which sums these rows over its window.
--
-- Parameters:
--   $paths             the Parquet files of one or more canonical_events partitions (their `dt=` directory
--                      names the day: DuckDB reads it as a hive partition column)
--   $event_types       the event types that signal interest (those with weight > 0); other events are ignored
--   $max_session_items each session keeps only its first $max_session_items distinct items, ordered by their
--                      first interest event (ts, then item_id), so one huge session cannot dominate
--
-- Rows per day (day, tenant, surface, item_a, item_b, sessions):
--   item_a < item_b         sessions (after capping) that contain both items
--   item_a = item_b = x     sessions that contain x (the per-item counts that normalise the scores)
--   item_a, item_b NULL     one row per tenant and surface: all sessions with at least one such item
--                           (the N of lift)
-- A session is a session of this partition: one that spans two partitions counts once in each.
WITH interest AS (
    SELECT dt AS day, tenant, surface, session_id, item_id, min(ts) AS first_ts
    FROM read_parquet($paths, hive_partitioning = true, hive_types = {'dt': DATE})
    WHERE list_contains($event_types::VARCHAR[], event_type)
    GROUP BY ALL
),
capped AS (
    SELECT day, tenant, surface, session_id, item_id
    FROM interest
    QUALIFY row_number() OVER (
        PARTITION BY day, tenant, surface, session_id ORDER BY first_ts, item_id
    ) <= $max_session_items
),
pairs AS (
    -- item_a <= item_b: the diagonal comes out of the same join as the pairs.
    SELECT a.day, a.tenant, a.surface, a.item_id AS item_a, b.item_id AS item_b, count(*) AS sessions
    FROM capped AS a
    JOIN capped AS b
      ON a.day = b.day AND a.tenant = b.tenant AND a.surface = b.surface AND a.session_id = b.session_id
     AND a.item_id <= b.item_id
    GROUP BY ALL
),
totals AS (
    SELECT day, tenant, surface, NULL::VARCHAR AS item_a, NULL::VARCHAR AS item_b,
           count(DISTINCT session_id) AS sessions
    FROM capped
    GROUP BY ALL
)
SELECT day, tenant, surface, item_a, item_b, sessions::BIGINT AS sessions
FROM (SELECT * FROM pairs UNION ALL SELECT * FROM totals)
ORDER BY day, tenant, surface, item_a NULLS FIRST, item_b NULLS FIRST
