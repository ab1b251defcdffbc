-- cooc: per tenant and surface, each item's top neighbours (up to top_k) by normalised co-occurrence.
-- Reads the pair_daily partitions of the window and sums them: c = sessions with both items,
-- na / nb = sessions with each item, n = all sessions (sessions capped as pair_daily did).
--
-- Parameters (SET VARIABLE each one first):
--   paths        the pair_daily Parquet files of the window's days
--   metric       'cosine' c / sqrt(na * nb) | 'count' c | 'jaccard' c / (na + nb - c)
--                | 'lift' c * n / (na * nb)
--   min_support  pairs with c < min_support are dropped
--   top_k        neighbours kept per item
--   max_items    only the max_items items in the most sessions take part (ties: item_id asc), on either side
--
-- Every pair is listed in both directions; per item, neighbours are ranked by score desc, count desc,
-- neighbor_id asc. Scores come from exact integer counts, so equal inputs give bit-identical output.
WITH summed AS (
    SELECT tenant, surface, item_a, item_b, sum(sessions)::BIGINT AS c
    FROM read_parquet(getvariable('paths'))
    GROUP BY tenant, surface, item_a, item_b
),

totals AS (
    SELECT tenant, surface, c AS n
    FROM summed
    WHERE item_a IS NULL AND item_b IS NULL
),

kept_items AS (
    SELECT tenant, surface, item_a AS item_id, c AS sessions
    FROM summed
    WHERE item_a = item_b
    QUALIFY
        row_number() OVER (PARTITION BY tenant, surface ORDER BY c DESC, item_a ASC)
        <= getvariable('max_items')
),

-- Each side's session count is joined in its own step: written as one three-way join, the optimiser may
-- join the two item lists with each other first (they share tenant and surface), a cross product.
with_a AS MATERIALIZED (
    SELECT p.tenant, p.surface, p.item_a, p.item_b, p.c, a.sessions AS na
    FROM summed AS p
    INNER JOIN kept_items AS a ON p.tenant = a.tenant AND p.surface = a.surface AND p.item_a = a.item_id
    WHERE p.item_a < p.item_b AND p.c >= getvariable('min_support')
),

scored AS (
    SELECT
        p.tenant,
        p.surface,
        p.item_a,
        p.item_b,
        p.c,
        CASE getvariable('metric')
            WHEN 'cosine' THEN p.c / sqrt(p.na::DOUBLE * b.sessions::DOUBLE)
            WHEN 'count' THEN p.c::DOUBLE
            WHEN 'jaccard' THEN p.c / (p.na + b.sessions - p.c)::DOUBLE
            WHEN 'lift' THEN (p.c::DOUBLE * t.n::DOUBLE) / (p.na::DOUBLE * b.sessions::DOUBLE)
            ELSE error(
                'cooc: unknown metric ' || getvariable('metric') || ' (use cosine, count, jaccard or lift)'
            )
        END AS score
    FROM with_a AS p
    INNER JOIN kept_items AS b ON p.tenant = b.tenant AND p.surface = b.surface AND p.item_b = b.item_id
    INNER JOIN totals AS t ON p.tenant = t.tenant AND p.surface = t.surface
),

directed AS (
    SELECT tenant, surface, item_a AS item_id, item_b AS neighbor_id, score, c AS count FROM scored
    UNION ALL
    SELECT tenant, surface, item_b AS item_id, item_a AS neighbor_id, score, c AS count FROM scored
)

SELECT
    tenant,
    surface,
    item_id,
    row_number() OVER (
        PARTITION BY tenant, surface, item_id ORDER BY score DESC, count DESC, neighbor_id ASC
    )::INTEGER AS rank,
    neighbor_id,
    score,
    count
FROM directed
QUALIFY rank <= getvariable('top_k')
ORDER BY tenant, surface, item_id, rank;
