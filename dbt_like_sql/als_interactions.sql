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
-- artifact (the weights are: each is summed in day order, below).
WITH pairs AS (
    SELECT
        tenant,
        surface,
        user_id,
        item_id,
        -- A user-item pair has at most one row a day. Both lists of a group are collected from the same
        -- rows in the same order, whatever that order is; the days put the weights in day order.
        list(day) AS pair_days,
        list(
            weight * CASE
                WHEN getvariable('half_life_days')::DOUBLE > 0
                    THEN pow(
                        0.5,
                        (getvariable('as_of')::DATE - day)::DOUBLE / getvariable('half_life_days')::DOUBLE
                    )
                ELSE 1.0
            END
        ) AS pair_weights
    FROM read_parquet(getvariable('paths'))
    GROUP BY tenant, surface, user_id, item_id
)

SELECT
    tenant,
    surface,
    user_id,
    item_id,
    -- Summed in day order so that equal inputs give bit-identical weights.
    list_sum(list_select(pair_weights, list_grade_up(pair_days)))::DOUBLE AS weight
FROM pairs;
