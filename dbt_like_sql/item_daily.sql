-- item_daily: per tenant, surface, item and event type, the day's event count and reach.
--
-- Parameters (SET VARIABLE each one first):
--   paths         the Parquet files of one or more canonical_events partitions (their `dt=` directory
--                 names the day: DuckDB reads it as a hive partition column)
--   value_scales  list of {event_type, scale}: the event types whose `value` scales their weight
--
-- scaled_events = the events counted by their value: each event of a type with a scale counts
-- clamp(value / scale, 0, 1) (1 without a value), any other event 1. Popularity multiplies it by the type's
-- weight. Each event's share is rounded to a fixed-point decimal and summed exactly, so a day gives the
-- same bits whichever days it is built with.
WITH value_scales AS (
    SELECT s.event_type, s.scale
    FROM (
        SELECT unnest(getvariable('value_scales')::STRUCT(event_type VARCHAR, scale DOUBLE)[]) AS s
    ) AS listed
)

SELECT
    e.dt AS day,
    e.tenant,
    e.surface,
    e.item_id,
    e.event_type,
    count(*) AS events,
    count(DISTINCT e.session_id) AS sessions,
    count(DISTINCT e.user_id) AS users,
    max(e.ts) AS last_ts,
    sum(
        CASE
            WHEN s.scale IS NULL OR e.value IS NULL THEN 1.0
            ELSE least(greatest(e.value / s.scale, 0.0), 1.0)
        END::DECIMAL(18, 6)
    )::DOUBLE AS scaled_events
FROM read_parquet(getvariable('paths'), hive_partitioning = TRUE, hive_types = {'dt': 'DATE'}) AS e
LEFT JOIN value_scales AS s ON e.event_type = s.event_type
GROUP BY e.dt, e.tenant, e.surface, e.item_id, e.event_type
ORDER BY day, e.tenant, e.surface, e.item_id, e.event_type;
