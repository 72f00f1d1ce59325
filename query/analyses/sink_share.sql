-- name: sink_share
-- description: Gu et al. 2025's sink share ("When attention sink emerges"): a head is a sink head in a
--   prompt when its mean attention to position 0 over every query position is strictly above the
--   threshold (>: equal does not count); the share is the fraction of heads that are, averaged over
--   prompts; per layer and overall (layer NULL). Published: LLaMA2-7B base 92.5%, LLaMA3-8B ~99%,
--   Mistral-7B 97.5% (threshold 0.3).
-- param: threshold DOUBLE = 0.3 | epsilon: a head counts when its mean attention to position 0 is strictly above this (>)
-- column: layer INTEGER | block index (NULL: every layer together)
-- column: n_prompts INTEGER | prompts averaged
-- column: n_heads INTEGER | heads per prompt counted
-- column: sink_share DOUBLE | fraction of heads whose mean attention to position 0 is strictly above the threshold (>), averaged over prompts
-- column: mean_alpha DOUBLE | mean over heads and prompts of the mean attention to position 0
WITH alpha AS (
    SELECT prompt, layer, head, avg(weight_first) AS alpha
    FROM first_token_share GROUP BY prompt, layer, head
),
per_prompt AS (
    SELECT prompt, layer, count(*) AS n, avg(CASE WHEN alpha > $threshold THEN 1.0 ELSE 0.0 END) AS share,
           avg(alpha) AS alpha
    FROM alpha GROUP BY GROUPING SETS ((prompt, layer), (prompt))
)
SELECT layer::INTEGER AS layer, count(*)::INTEGER AS n_prompts, max(n)::INTEGER AS n_heads,
       avg(share)::DOUBLE AS sink_share, avg(alpha)::DOUBLE AS mean_alpha
FROM per_prompt GROUP BY layer ORDER BY layer NULLS LAST
