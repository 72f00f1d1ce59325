-- name: dla_vs_ablation_heads
-- description: Every head of every ablated layer: mean DLA and mean ablation effect
--   (clean minus ablated target logit) over prompts, side by side, ranked by ablation effect.
--   Heads far above the diagonal act indirectly (through later layers). Empty without
--   ablation shards.
-- param: mode VARCHAR {zero,mean} = 'zero' | ablation mode
-- column: layer INTEGER | block index
-- column: head INTEGER | head index
-- column: n_prompts BIGINT | prompts averaged
-- column: mean_dla DOUBLE | mean direct logit attribution
-- column: mean_logit_diff DOUBLE | mean clean minus ablated target logit
-- column: mean_kl DOUBLE | mean KL(clean || ablated)
-- column: ablation_rank BIGINT | rank of mean_logit_diff over all heads (1 = largest)
-- column: dla_rank BIGINT | rank of mean_dla over all heads (1 = largest)
WITH j AS (
    SELECT a.layer, a.head, a.prompt, a.logit_diff, a.kl, d.dla
    FROM ablation a
    JOIN dla d ON d.prompt = a.prompt AND d.layer = a.layer AND d.head = a.head AND d.component = 'head'
    WHERE a.unit_kind = 'head' AND a.mode = CAST($mode AS VARCHAR)
),
agg AS (
    SELECT layer, head, count(*) AS n_prompts, avg(dla) AS mean_dla,
           avg(logit_diff) AS mean_logit_diff, avg(kl) AS mean_kl
    FROM j GROUP BY layer, head
)
SELECT *, rank() OVER (ORDER BY mean_logit_diff DESC) AS ablation_rank,
          rank() OVER (ORDER BY mean_dla DESC) AS dla_rank
FROM agg
ORDER BY ablation_rank, layer, head
