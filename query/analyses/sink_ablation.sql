-- name: sink_ablation
-- description: What removing attention to position 0 does, per head (and head NULL: every head of the
--   layer at once), from --ablation sink / sink_norenorm: sink renormalises the head's weights over
--   the other keys (a head with weight ~1 on position 0 then puts ~1 on whatever else it saw),
--   sink_norenorm only removes position 0's value contribution. Beside the head's attention and
--   output-norm share from position 0 at the last position. Every effect is against the ablation
--   engine's clean run (the ablation view's clean_* columns). top1_changed here is a fraction over
--   prompts (0 to 1) of the ablation view's per-prompt BOOLEAN of the same name.
-- param: mode VARCHAR {sink,sink_norenorm} = 'sink' | which removal
-- column: layer INTEGER | block index
-- column: head INTEGER | head index (NULL: every head of the layer at once)
-- column: n_prompts INTEGER | prompts averaged
-- column: weight_first DOUBLE | mean attention weight on position 0 at the last position (NULL for the whole layer: mean over heads)
-- column: norm_share_first DOUBLE | mean share of the head's output norm from position 0 at the last position
-- column: mean_logit_diff DOUBLE | mean clean minus ablated target logit
-- column: max_abs_logit_diff DOUBLE | largest |logit_diff| over prompts
-- column: mean_kl DOUBLE | mean KL(clean || ablated), nats
-- column: top1_changed DOUBLE | fraction (0 to 1) of the n_prompts prompts whose top-1 token under the ablation differs from the engine's clean top-1 (the mean of the ablation view's BOOLEAN top1_changed)
WITH ab AS (
    SELECT a.prompt, a.layer, a.head, a.logit_diff, a.kl, a.top1_changed AS changed
    FROM ablation a
    WHERE a.mode = $mode AND a.unit_kind IN ('head', 'all_heads')
),
fs AS (
    SELECT prompt, layer, head, weight_first, norm_share_first
    FROM first_token_share WHERE query_role = 4
),
fl AS (  -- the whole layer: mean over its heads
    SELECT prompt, layer, NULL::INTEGER AS head, avg(weight_first) AS weight_first,
           avg(norm_share_first) AS norm_share_first
    FROM fs GROUP BY prompt, layer
),
f AS (SELECT * FROM fs UNION ALL SELECT * FROM fl)
SELECT ab.layer, ab.head, count(*)::INTEGER AS n_prompts,
       avg(f.weight_first)::DOUBLE AS weight_first, avg(f.norm_share_first)::DOUBLE AS norm_share_first,
       avg(ab.logit_diff)::DOUBLE AS mean_logit_diff, max(abs(ab.logit_diff))::DOUBLE AS max_abs_logit_diff,
       avg(ab.kl)::DOUBLE AS mean_kl, avg(CASE WHEN ab.changed THEN 1.0 ELSE 0.0 END)::DOUBLE AS top1_changed
FROM ab LEFT JOIN f ON f.prompt = ab.prompt AND f.layer = ab.layer AND f.head IS NOT DISTINCT FROM ab.head
GROUP BY ab.layer, ab.head ORDER BY ab.layer, ab.head NULLS LAST
