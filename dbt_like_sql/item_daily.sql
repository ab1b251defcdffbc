-- item_daily: per tenant, surface, item and event type, the day's event count and reach.
-- Parameters: $paths (the Parquet files of one canonical_events partition), $day (the partition date).
SELECT
    $day::DATE AS day,
    tenant,
    surface,
    item_id,
    event_type,
    count(*) AS events,
    count(DISTINCT session_id) AS sessions,
    count(DISTINCT user_id) AS users,
    max(ts) AS last_ts
FROM read_parquet($paths)
GROUP BY ALL
ORDER BY tenant, surface, item_id, event_type
