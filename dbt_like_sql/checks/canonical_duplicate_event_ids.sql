-- (tenant, event id) pairs that occur more than once in one canonical_events partition: deduplication
-- failed. Event ids are idempotency keys within a tenant.
-- Parameters (SET VARIABLE each one first): paths.
SELECT
    tenant, event_id, count(*) AS occurrences, min(source_file) AS first_file, min(source_line) AS first_line
FROM read_parquet(getvariable('paths'))
GROUP BY tenant, event_id
HAVING count(*) > 1
ORDER BY occurrences DESC, tenant ASC, event_id ASC;
