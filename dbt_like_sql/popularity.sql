-- popularity: per tenant and surface, the top items (up to top_n) of the window by weighted event count.
-- Reads the item_daily partitions of the window (one row per day, item and event type).
--
-- Parameters (SET VARIABLE each one first):
--   paths           the item_daily Parquet files of the window's days
--   weights         list of {event_type, weight}; types with weight <= 0 (exposures by default) are ignored
--   as_of           the window's last day
--   half_life_days  0 = no decay; else a day's events weigh 0.5 ^ ((as_of - day) / half_life_days)
--   top_n           items kept per tenant and surface
--
-- score = sum of scaled_events * weight * decay (scaled_events: the events counted by their value, see
-- item_daily.sql); events = the undecayed count of those (weighted) events.
-- Ranked by score desc; equal scores by reach: user-days desc (each day's distinct users of each weighted
-- event type, summed over the window), then events desc, then the latest event desc, and only then item_id.
-- Only items with a positive score are listed.
WITH weights AS (
    SELECT w.event_type, w.weight
    FROM (SELECT unnest(getvariable('weights')::STRUCT(event_type VARCHAR, weight DOUBLE)[]) AS w) AS listed
    WHERE w.weight > 0
),

window_rows AS (
    -- Required columns: day, tenant, surface, item_id, event_type, events. The others default to NULL (this
    -- typed empty row adds each one a file lacks): without scaled_events (partitions built before item_daily
    -- had it) each event counts fully, as it did when they were built; without users or last_ts, ties fall
    -- through to the next key.
    SELECT * FROM read_parquet(getvariable('paths'), union_by_name = TRUE)
    UNION ALL BY NAME
    SELECT NULL::DOUBLE AS scaled_events, NULL::BIGINT AS users, NULL::TIMESTAMPTZ AS last_ts
    WHERE FALSE
),

terms AS (
    SELECT
        d.tenant,
        d.surface,
        d.item_id,
        d.day,
        d.event_type,
        d.events,
        d.users,
        d.last_ts,
        coalesce(d.scaled_events, d.events) * w.weight * CASE
            WHEN getvariable('half_life_days')::DOUBLE > 0
                THEN
                    pow(
                        0.5,
                        (getvariable('as_of')::DATE - d.day)::DOUBLE / getvariable('half_life_days')::DOUBLE
                    )
            ELSE 1.0
        END AS score
    FROM window_rows AS d
    INNER JOIN weights AS w ON d.event_type = w.event_type
),

items AS (
    -- Each term rounded to a fixed-point decimal, then summed exactly: equal inputs give the same bits in any
    -- order, and items whose sums are equal tie exactly (rounding noise never decides their order).
    SELECT
        tenant, surface, item_id,
        sum(score::DECIMAL(38, 9))::DOUBLE AS score,
        sum(events)::BIGINT AS events,
        sum(users)::BIGINT AS user_days,
        max(last_ts) AS last_ts
    FROM terms
    GROUP BY tenant, surface, item_id
)

SELECT
    tenant,
    surface,
    row_number() OVER (
        PARTITION BY tenant, surface
        ORDER BY score DESC, user_days DESC NULLS LAST, events DESC, last_ts DESC NULLS LAST, item_id ASC
    )::INTEGER AS rank,
    item_id,
    score,
    events
FROM items
WHERE score > 0
QUALIFY rank <= getvariable('top_n')
ORDER BY tenant, surface, rank;
