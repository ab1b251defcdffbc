-- als_interactions: per tenant, surface, known user and item, the window's interaction strength, the
-- input matrix of the `als` artifact.
-- Reads the user_item_daily partitions of the window (weighted interest events of known users only).
--
-- Parameters (SET VARIABLE each one first):
--   paths           the user_item_daily Parquet files of the window's days
--   as_of           the window's last day
--   half_life_days  0 = no decay; else a day's weight is multiplied by 0.5 ^ ((as_of - day) / half_life_days)
--
-- weight = the sum over the window of each day's event-type-weighted interactions, decayed.
-- Rows in no particular order: the trainer sorts users and items itself, so the order is not part of the
-- artifact.
SELECT
    tenant,
    surface,
    user_id,
    item_id,
    -- Each day's decayed weight rounded to a fixed-point decimal, then summed exactly: the same input
    -- always gives the same bits, whatever order the days are summed in. (Without decay the daily weights
    -- are already 6-decimal exact, so nothing is rounded.)
    sum(
        (weight * CASE
            WHEN getvariable('half_life_days')::DOUBLE > 0
                THEN pow(
                    0.5,
                    (getvariable('as_of')::DATE - day)::DOUBLE / getvariable('half_life_days')::DOUBLE
                )
            ELSE 1.0
        END)::DECIMAL(38, 12)
    )::DOUBLE AS weight
FROM read_parquet(getvariable('paths'))
GROUP BY tenant, surface, user_id, item_id;
