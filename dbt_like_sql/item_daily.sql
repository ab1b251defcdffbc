-- item_daily: per tenant, surface, item and event type, the day's event count and reach.
-- Parameters (SET VARIABLE each one first): paths, the Parquet files of one or more canonical_events
-- partitions (their `dt=` directory names the day: DuckDB reads it as a hive partition column).
SELECT
    dt AS day,
    tenant,
    surface,
    item_id,
    event_type,
    count(*) AS events,
    count(DISTINCT session_id) AS sessions,
    count(DISTINCT user_id) AS users,
    max(ts) AS last_ts
FROM read_parquet(getvariable('paths'), hive_partitioning = TRUE, hive_types = {'dt': 'DATE'})
GROUP BY ALL
ORDER BY day, tenant, surface, item_id, event_type;
