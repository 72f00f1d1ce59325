-- name: dla_vs_ablation_corr
-- description: Per ablated layer, the Spearman rank correlation across heads between DLA and
--   ablation effect (logit_diff), computed per prompt then summarised over prompts. Tied values
--   get their average rank (standard Spearman); a prompt whose heads all tie on one measure has
--   no correlation and is not counted. Empty without ablation shards.
-- param: layer INTEGER = NULL | only this block (NULL: every ablated layer)
-- param: mode VARCHAR {zero,mean} = 'zero' | ablation mode (NULL = every mode)
-- column: layer INTEGER | block index
-- column: mode VARCHAR | ablation mode
-- column: n_prompts BIGINT | prompts with a defined correlation
-- column: mean_spearman DOUBLE | mean over prompts of the per-prompt rank correlation
-- column: median_spearman DOUBLE | its median
-- column: min_spearman DOUBLE | its minimum
-- column: max_spearman DOUBLE | its maximum
WITH j AS (
    SELECT a.prompt, a.layer, a.mode, a.head, a.logit_diff, d.dla
    FROM ablation a
    JOIN dla d ON d.prompt = a.prompt AND d.layer = a.layer AND d.head = a.head
              AND d.component = 'head'
    WHERE a.unit_kind = 'head'
      AND (CAST($mode AS VARCHAR) IS NULL OR a.mode = CAST($mode AS VARCHAR))
      AND (CAST($layer AS INTEGER) IS NULL OR a.layer = CAST($layer AS INTEGER))
),
r AS (
    SELECT prompt, layer, mode,
           rank() OVER (PARTITION BY prompt, layer, mode ORDER BY dla)
             + (count(*) OVER (PARTITION BY prompt, layer, mode, dla) - 1) / 2.0 AS rank_dla,
           rank() OVER (PARTITION BY prompt, layer, mode ORDER BY logit_diff)
             + (count(*) OVER (PARTITION BY prompt, layer, mode, logit_diff) - 1) / 2.0 AS rank_ablation
    FROM j
),
c AS (
    -- corr() of a constant is NaN, not NULL: such a prompt has no correlation
    SELECT prompt, layer, mode,
           CASE WHEN var_pop(rank_dla) > 0 AND var_pop(rank_ablation) > 0
                THEN corr(rank_dla, rank_ablation) END AS rho
    FROM r GROUP BY prompt, layer, mode
)
SELECT layer, mode, count(rho) AS n_prompts, avg(rho) AS mean_spearman,
       median(rho) AS median_spearman, min(rho) AS min_spearman, max(rho) AS max_spearman
FROM c
GROUP BY layer, mode
ORDER BY mode, layer
