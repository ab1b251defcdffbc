-- pair_daily: per tenant and surface, how many of the day's sessions contain each pair of items.
-- Input to the `cooc` window artifact, which sums these rows over its window.
--
-- Parameters (SET VARIABLE each one first):
--   paths              the Parquet files of one or more canonical_events partitions (their `dt=` directory
--                      names the day: DuckDB reads it as a hive partition column)
--   event_types        the event types that signal interest (those with weight > 0); other events are ignored
--   max_session_items  (>= 1) each session keeps only its first max_session_items distinct items, ordered by
--                      their first interest event (ts, then item_id), so one huge session cannot dominate
--
-- Rows per day (day, tenant, surface, item_a, item_b, sessions):
--   item_a < item_b         sessions (after capping) that contain both items
--   item_a = item_b = x     sessions that contain x (the per-item counts that normalise the scores)
--   item_a, item_b NULL     one row per tenant and surface: all sessions with at least one such item
--                           (the N of lift)
-- A session is a session of this partition: one that spans two partitions counts once in each.
--
-- How, for speed: only the sessions over the cap are ranked (a window over every session costs more than
-- the rest of the capping); the self-join on the session yields only item_a < item_b, the diagonal is
-- counted from the capped items and the totals from the per-session item counts the cap needs anyway.
WITH interest AS (
    SELECT dt AS day, tenant, surface, session_id, item_id, min(ts) AS first_ts
    FROM read_parquet(getvariable('paths'), hive_partitioning = TRUE, hive_types = {'dt': 'DATE'})
    -- An IN subquery, not list_contains: DuckDB turns the set into a filter inside the Parquet scan, which
    -- then decodes the other columns only for interest events.
    WHERE event_type IN (SELECT unnest(getvariable('event_types')::VARCHAR[]))
    GROUP BY ALL
),

session_sizes AS (
    SELECT day, tenant, surface, session_id, count(*) AS items
    FROM interest
    GROUP BY ALL
),

over_cap AS (
    SELECT day, tenant, surface, session_id
    FROM session_sizes
    WHERE items > getvariable('max_session_items')
),

over_cap_kept AS MATERIALIZED (
    -- Materialized: `capped` is read three times, the window should run once.
    SELECT day, tenant, surface, session_id, i.item_id
    FROM interest AS i SEMI JOIN over_cap USING (day, tenant, surface, session_id)
    QUALIFY row_number() OVER (
        PARTITION BY day, tenant, surface, session_id ORDER BY i.first_ts, i.item_id
    ) <= getvariable('max_session_items')
),

capped AS NOT MATERIALIZED (
    -- Not materialized: filtering `interest` again on each read is cheaper than storing a copy of it.
    SELECT day, tenant, surface, session_id, i.item_id
    FROM interest AS i ANTI JOIN over_cap USING (day, tenant, surface, session_id)
    UNION ALL
    SELECT * FROM over_cap_kept
),

pairs AS (
    SELECT a.day, a.tenant, a.surface, a.item_id AS item_a, b.item_id AS item_b, count(*) AS sessions
    FROM capped AS a
    INNER JOIN capped AS b
        ON
            a.day = b.day AND a.tenant = b.tenant AND a.surface = b.surface AND a.session_id = b.session_id
            AND a.item_id < b.item_id
    GROUP BY ALL
),

diagonal AS (
    SELECT day, tenant, surface, item_id AS item_a, item_id AS item_b, count(*) AS sessions
    FROM capped
    GROUP BY ALL
),

totals AS (
    -- Capping never drops a whole session (max_session_items >= 1): count them before it.
    SELECT day, tenant, surface, NULL::VARCHAR AS item_a, NULL::VARCHAR AS item_b, count(*) AS sessions
    FROM session_sizes
    GROUP BY ALL
)

SELECT day, tenant, surface, item_a, item_b, sessions::BIGINT AS sessions
FROM (
    SELECT * FROM pairs
    UNION ALL
    SELECT * FROM diagonal
    UNION ALL
    SELECT * FROM totals
) AS all_rows
ORDER BY day, tenant, surface, item_a NULLS FIRST, item_b NULLS FIRST;
