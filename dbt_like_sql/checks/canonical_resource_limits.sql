-- Resource limits of one canonical_events partition: one row per limit that is exceeded.
-- Parameters (SET VARIABLE each one first): paths, max_events, max_distinct_items, max_sessions,
-- max_items_per_session.
-- Producer events only: the API server's own exposure log (files exposures-*.jsonl) is bounded by the
-- server's daily byte cap, and a client of the API must not be able to trip these limits through it.
WITH events AS (
    SELECT * FROM read_parquet(getvariable('paths'))
    WHERE NOT regexp_matches(source_file, '(^|/)exposures-[^/]*\.jsonl(\.gz)?$')
),

per_session AS (
    SELECT tenant, surface, session_id, count(DISTINCT item_id) AS items
    FROM events
    GROUP BY ALL
),

measures AS (
    SELECT
        'events' AS measure,
        (SELECT count(*) FROM events) AS observed,
        getvariable('max_events') AS limit_value
    UNION ALL
    SELECT
        'distinct_items' AS measure,
        (SELECT count(DISTINCT row(tenant, surface, item_id)) FROM events) AS observed,
        getvariable('max_distinct_items') AS limit_value
    UNION ALL
    SELECT
        'sessions' AS measure,
        (SELECT count(*) FROM per_session) AS observed,
        getvariable('max_sessions') AS limit_value
    UNION ALL
    SELECT
        'items_per_session' AS measure,
        (SELECT coalesce(max(items), 0) FROM per_session) AS observed,
        getvariable('max_items_per_session') AS limit_value
)

SELECT measure, observed, limit_value
FROM measures
WHERE observed > limit_value
ORDER BY measure;
