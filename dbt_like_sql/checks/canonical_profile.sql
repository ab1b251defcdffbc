-- One pass over a canonical_events partition: the figure each row gate judges. A gate whose figure is not
-- zero then runs its own query (canonical_null_keys, canonical_duplicate_event_ids,
-- canonical_ts_out_of_range) for the offending rows; the resource limits compare the last four figures.
-- Parameters (SET VARIABLE each one first): paths, window_start, window_end (UTC timestamps; the arrival
-- window is [start, end)), exposure_files (the partition's landing files that are the server's exposure
-- log, named exposures-*.jsonl; a list rather than a pattern matched on every row).
-- The resource figures count producer events only: the API server's own exposure log (files
-- exposures-*.jsonl) is bounded by the server's daily byte cap, and a client of the API must not be able
-- to trip these limits through it.
WITH events AS (
    SELECT * FROM read_parquet(getvariable('paths'))
),

producer AS (
    SELECT * FROM events
    WHERE NOT list_contains(getvariable('exposure_files')::VARCHAR[], source_file)
),

per_session AS (
    SELECT tenant, surface, session_id, count(DISTINCT item_id) AS items
    FROM producer
    GROUP BY ALL
)

SELECT
    (
        SELECT count(*) FROM events
        WHERE
            event_id IS NULL OR ts IS NULL OR tenant IS NULL OR surface IS NULL
            OR session_id IS NULL OR item_id IS NULL
    ) AS null_key_rows,
    (SELECT count(*) - count(DISTINCT row(tenant, event_id)) FROM events) AS duplicate_id_rows,
    (
        SELECT count(*) FROM events
        WHERE
            ts < getvariable('window_start')::TIMESTAMPTZ
            OR ts >= getvariable('window_end')::TIMESTAMPTZ
    ) AS ts_out_of_range_rows,
    (SELECT count(*) FROM producer) AS events,
    (SELECT count(DISTINCT row(tenant, surface, item_id)) FROM producer) AS distinct_items,
    (SELECT count(*) FROM per_session) AS sessions,
    (SELECT coalesce(max(items), 0) FROM per_session) AS items_per_session;
