-- user_item_daily: per tenant, surface, known user and item, the day's weighted interest.
-- Input to the `user_history` window artifact.
--
-- Parameters (SET VARIABLE each one first):
--   paths    the Parquet files of one or more canonical_events partitions (their `dt=` directory names
--            the day: DuckDB reads it as a hive partition column)
--   weights  list of {event_type, weight}: the weight of one event of each type
--
-- Only events of types with weight > 0 count (exposures, weight 0 by default, are not interest: an item
-- merely shown must not hide it from recommendations as "seen"). Anonymous events (user_id NULL) are
-- skipped: there is no user to attach a history to.
-- Columns: day, tenant, surface, user_id, item_id, weight (sum of event weights), events, last_ts.
WITH weights AS (
    SELECT w.event_type, w.weight
    FROM (SELECT unnest(getvariable('weights')::STRUCT(event_type VARCHAR, weight DOUBLE)[]) AS w) AS listed
    WHERE w.weight > 0
),

per_type AS (
    -- count * weight per type, then a sum in a fixed order: the same input always gives the same bits.
    SELECT
        e.dt AS day, e.tenant, e.surface, e.user_id, e.item_id, e.event_type,
        count(*) AS events, count(*) * any_value(w.weight) AS weight, max(e.ts) AS last_ts
    FROM read_parquet(getvariable('paths'), hive_partitioning = TRUE, hive_types = {'dt': 'DATE'}) AS e
    INNER JOIN weights AS w ON e.event_type = w.event_type
    WHERE e.user_id IS NOT NULL
    GROUP BY e.dt, e.tenant, e.surface, e.user_id, e.item_id, e.event_type
)

SELECT
    day,
    tenant,
    surface,
    user_id,
    item_id,
    list_sum(list(weight ORDER BY event_type))::DOUBLE AS weight,
    sum(events)::BIGINT AS events,
    max(last_ts) AS last_ts
FROM per_type
GROUP BY day, tenant, surface, user_id, item_id
ORDER BY day, tenant, surface, user_id, item_id;
