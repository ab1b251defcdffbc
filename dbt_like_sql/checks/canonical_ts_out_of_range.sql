-- Canonical events whose timestamp lies outside the arrival window of their partition.
-- Parameters (SET VARIABLE each one first): paths, window_start, window_end (UTC timestamps; the window
-- is [start, end)).
SELECT event_id, ts, source_file, source_line
FROM read_parquet(getvariable('paths'))
WHERE ts < getvariable('window_start')::TIMESTAMPTZ OR ts >= getvariable('window_end')::TIMESTAMPTZ
ORDER BY ts, event_id;
