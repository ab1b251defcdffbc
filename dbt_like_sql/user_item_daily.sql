-- user_item_daily: per tenant, surface, known user and item, the day's weighted interest.
-- Input to the `user_history` and `als` window artifacts and to the offline evaluation.
--
-- Parameters (SET VARIABLE each one first):
--   paths         the Parquet files of one or more canonical_events partitions (their `dt=` directory
--                 names the day: DuckDB reads it as a hive partition column)
--   weights       list of {event_type, weight}: the weight of one event of each type
--   value_scales  list of {event_type, scale}: the event types whose `value` scales their weight
--
-- Only events of types with weight > 0 count (exposures, weight 0 by default, are not interest: an item
-- merely shown must not hide it from recommendations as "seen"). Anonymous events (user_id NULL) are
-- skipped: there is no user to attach a history to.
-- An event weighs its type's weight, times clamp(value / scale, 0, 1) for a type with a scale and a value
-- (a 0.5-star rating on a scale of 5 weighs a tenth of a 5-star one).
-- Columns: day, tenant, surface, user_id, item_id, weight (sum of event weights), events, last_ts.
WITH weights AS (
    SELECT w.event_type, w.weight
    FROM (SELECT unnest(getvariable('weights')::STRUCT(event_type VARCHAR, weight DOUBLE)[]) AS w) AS listed
    WHERE w.weight > 0
),

value_scales AS (
    SELECT s.event_type, s.scale
    FROM (
        SELECT unnest(getvariable('value_scales')::STRUCT(event_type VARCHAR, scale DOUBLE)[]) AS s
    ) AS listed
)

SELECT
    e.dt AS day,
    e.tenant,
    e.surface,
    e.user_id,
    e.item_id,
    -- Each event's weight rounded to a fixed-point decimal, then summed exactly: the same input always
    -- gives the same bits, whatever order the events are summed in.
    sum(
        (w.weight * CASE
            WHEN s.scale IS NULL OR e.value IS NULL THEN 1.0
            ELSE least(greatest(e.value / s.scale, 0.0), 1.0)
        END)::DECIMAL(18, 6)
    )::DOUBLE AS weight,
    count(*)::BIGINT AS events,
    max(e.ts) AS last_ts
FROM read_parquet(getvariable('paths'), hive_partitioning = TRUE, hive_types = {'dt': 'DATE'}) AS e
INNER JOIN weights AS w ON e.event_type = w.event_type
LEFT JOIN value_scales AS s ON e.event_type = s.event_type
WHERE e.user_id IS NOT NULL
GROUP BY e.dt, e.tenant, e.surface, e.user_id, e.item_id
ORDER BY day, e.tenant, e.surface, e.user_id, e.item_id;
