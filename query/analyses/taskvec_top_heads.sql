-- name: taskvec_top_heads
-- description: The heads that carry the function vector: every head's average indirect effect
--   (AIE: mean over held-out words of the target-probability gain when its train-mean output is
--   put in at the last position of the shuffled-label prompt), ranked, beside the same head's rank
--   by mean zero-ablation effect and by mean DLA (both over every prompt of the warehouse, to its
--   target, as dla_vs_ablation_heads), by mean recovery when patched at every differing position
--   (head_all, over every pair direction, as patching_top_heads) and by mean attention on the first
--   token at the last position (sink_heads). Ranks are of the signed means, descending, over every
--   head with data (1 = largest; ties share the smallest rank); NULL where that experiment was not
--   extracted. Are the heads that carry the task the heads the ablation found?
-- param: top INTEGER = 10 | heads kept, by AIE rank
-- column: layer INTEGER | block index
-- column: head INTEGER | head index
-- column: n_words BIGINT | held-out words averaged
-- column: aie DOUBLE | average indirect effect (probability)
-- column: aie_rank BIGINT | rank by aie (1 = largest)
-- column: mean_ablation DOUBLE | mean zero-ablation effect (clean - ablated target logit)
-- column: ablation_rank BIGINT | rank of mean_ablation over every ablated head
-- column: mean_dla DOUBLE | mean direct logit attribution to the target
-- column: dla_rank BIGINT | rank of mean_dla over every head
-- column: mean_recovery DOUBLE | mean patching recovery of the head (head_all)
-- column: patching_rank BIGINT | rank of mean_recovery over every patched head
-- column: weight_first DOUBLE | mean attention on position 0 at the last position
-- column: sink_rank BIGINT | rank of weight_first over every head
WITH a AS (
    SELECT layer, head, count(*) AS n_words, avg(aie) AS aie FROM taskvec_aie GROUP BY layer, head
),
abl AS (
    SELECT layer, head, avg(logit_diff) AS mean_ablation FROM ablation
    WHERE unit_kind = 'head' AND mode = 'zero' GROUP BY layer, head
),
dl AS (
    SELECT layer, head, avg(dla) AS mean_dla FROM dla WHERE component = 'head' GROUP BY layer, head
),
pat AS (
    SELECT layer, head, avg(recovery) AS mean_recovery FROM patching WHERE kind = 'head_all' GROUP BY layer, head
),
sink AS (
    SELECT layer, head, avg(weight_first) AS weight_first FROM first_token_share
    WHERE query_role = 4 GROUP BY layer, head
),
ranked AS (
    SELECT a.layer, a.head, a.n_words, a.aie, rank() OVER (ORDER BY a.aie DESC) AS aie_rank,
           abl.mean_ablation,
           CASE WHEN abl.mean_ablation IS NULL THEN NULL
                ELSE rank() OVER (ORDER BY abl.mean_ablation DESC NULLS LAST) END AS ablation_rank,
           dl.mean_dla,
           CASE WHEN dl.mean_dla IS NULL THEN NULL
                ELSE rank() OVER (ORDER BY dl.mean_dla DESC NULLS LAST) END AS dla_rank,
           pat.mean_recovery,
           CASE WHEN pat.mean_recovery IS NULL THEN NULL
                ELSE rank() OVER (ORDER BY pat.mean_recovery DESC NULLS LAST) END AS patching_rank,
           sink.weight_first,
           CASE WHEN sink.weight_first IS NULL THEN NULL
                ELSE rank() OVER (ORDER BY sink.weight_first DESC NULLS LAST) END AS sink_rank
    FROM a
    LEFT JOIN abl USING (layer, head)
    LEFT JOIN dl USING (layer, head)
    LEFT JOIN pat USING (layer, head)
    LEFT JOIN sink USING (layer, head)
)
SELECT * FROM ranked
WHERE aie_rank <= CAST($top AS INTEGER)
ORDER BY aie_rank, layer, head
