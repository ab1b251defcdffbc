-- The sessions with the most distinct items in one canonical_events partition (context for limits),
-- among producer events (as canonical_profile.sql counts them: without the server's exposure log).
-- Parameters (SET VARIABLE each one first): paths, max_rows.
SELECT tenant, surface, session_id, count(DISTINCT item_id) AS items, count(*) AS events
FROM read_parquet(getvariable('paths'))
WHERE NOT regexp_matches(source_file, '(^|/)exposures-[^/]*\.jsonl(\.gz)?$')
GROUP BY ALL
ORDER BY items DESC, session_id ASC
LIMIT getvariable('max_rows');
