-- Canonical events whose key fields are null: every row returned violates the contract.
-- Parameters (SET VARIABLE each one first): paths (the Parquet files of one canonical_events partition).
SELECT event_id, ts, tenant, surface, session_id, item_id, source_file, source_line
FROM read_parquet(getvariable('paths'))
WHERE
    event_id IS NULL OR ts IS NULL OR tenant IS NULL OR surface IS NULL
    OR session_id IS NULL OR item_id IS NULL
ORDER BY source_file, source_line;
