-- Event ids that occur more than once in one canonical_events partition (deduplication failed).
-- Parameters: $paths.
SELECT event_id, count(*) AS occurrences, min(source_file) AS first_file, min(source_line) AS first_line
FROM read_parquet($paths)
GROUP BY event_id
HAVING count(*) > 1
ORDER BY occurrences DESC, event_id
