-- name: block_ablation
-- description: Whole-block ablation per layer: what removing the attention block or the MLP
--   block does to the target and the distribution, averaged over prompts ("does the
--   processing happen in the MLPs?"). Empty without ablation shards.
-- param: mode VARCHAR {zero,mean} = 'zero' | ablation mode
-- column: layer INTEGER | block index
-- column: unit_kind VARCHAR | 'attn' or 'mlp'
-- column: n_prompts BIGINT | prompts averaged
-- column: mean_logit_diff DOUBLE | mean clean minus ablated target logit
-- column: mean_kl DOUBLE | mean KL(clean || ablated)
-- column: frac_top1_changed DOUBLE | fraction of prompts whose top-1 token changes (against the engine's clean run)
SELECT a.layer, a.unit_kind, count(*) AS n_prompts, avg(a.logit_diff) AS mean_logit_diff,
       avg(a.kl) AS mean_kl, avg(CAST(a.top1_changed AS DOUBLE)) AS frac_top1_changed
FROM ablation a
WHERE a.unit_kind <> 'head' AND a.mode = CAST($mode AS VARCHAR)
GROUP BY a.layer, a.unit_kind
ORDER BY a.layer, a.unit_kind
