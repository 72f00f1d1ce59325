-- name: patching_attribution
-- description: Where attribution patching's linear approximation holds: per pair direction,
--   patch kind and layer, the rank (Spearman) and linear (Pearson) correlation between the
--   attribution estimate and the exact change of the logit difference over every patch and
--   word, and the mean absolute error relative to the mean |exact effect|. Spearman uses
--   average ranks for ties (many late-layer patches change nothing exactly, and their
--   attribution is exactly 0).
-- param: direction INTEGER = NULL | 0 (template a into b), 1 (b into a); NULL = both
-- column: pair VARCHAR | template pair 'a-b'
-- column: direction INTEGER | 0: a into b; 1: b into a
-- column: kind VARCHAR | resid, attn, mlp, head or head_all
-- column: layer INTEGER | block index (resid: boundary - 1)
-- column: n BIGINT | patches compared
-- column: spearman DOUBLE | rank correlation of attribution and exact ld_change (Pearson of average ranks)
-- column: pearson DOUBLE | linear correlation
-- column: mean_abs_error DOUBLE | mean |attribution - ld_change|
-- column: rel_error DOUBLE | mean_abs_error / mean |ld_change| (NULL when the exact effects are all 0)
-- column: max_abs_error DOUBLE | largest |attribution - ld_change|
WITH r AS (
    SELECT pair, direction, kind, layer, attribution, ld_change,
           rank() OVER w_a + (count(*) OVER t_a - 1) / 2.0 AS ra,  -- average rank of a tie
           rank() OVER w_e + (count(*) OVER t_e - 1) / 2.0 AS re
    FROM patching
    WHERE kind IN ('resid', 'attn', 'mlp', 'head', 'head_all')
      AND (CAST($direction AS INTEGER) IS NULL OR direction = CAST($direction AS INTEGER))
    WINDOW w_a AS (PARTITION BY pair, direction, kind, layer ORDER BY attribution),
           w_e AS (PARTITION BY pair, direction, kind, layer ORDER BY ld_change),
           t_a AS (PARTITION BY pair, direction, kind, layer, attribution),
           t_e AS (PARTITION BY pair, direction, kind, layer, ld_change)
)
SELECT pair, direction, kind, layer, count(*) AS n,
       corr(ra, re) AS spearman, corr(attribution, ld_change) AS pearson,
       avg(abs(attribution - ld_change))::DOUBLE AS mean_abs_error,
       avg(abs(attribution - ld_change)) / nullif(avg(abs(ld_change)), 0) AS rel_error,
       max(abs(attribution - ld_change))::DOUBLE AS max_abs_error
FROM r
GROUP BY pair, direction, kind, layer
ORDER BY pair, direction, kind, layer
