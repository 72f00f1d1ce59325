-- name: compare_top_heads
-- description: Each model's top heads by mean ablation effect (clean minus ablated target
--   logit) and by mean DLA, at relative depth layer / n_layers (comparison). Ranks are within
--   a model over every head with data (ablation: its ablated layers only); ties share a rank,
--   so a model can list more than `top` heads per measure.
-- param: mode VARCHAR {zero,mean} = 'zero' | ablation mode
-- param: top INTEGER = 5 | heads per model and measure
-- column: model VARCHAR | the model's label
-- column: measure VARCHAR | 'ablation' or 'dla': what the heads are ranked by
-- column: rank BIGINT | rank within the model by that measure (1 = largest)
-- column: layer INTEGER | block index
-- column: head INTEGER | head index
-- column: n_layers INTEGER | the model's blocks
-- column: rel_depth DOUBLE | layer / n_layers
-- column: mean_logit_diff DOUBLE | mean ablation effect over prompts (NULL: the layer was not ablated)
-- column: mean_dla DOUBLE | mean DLA over prompts
-- column: n_prompts BIGINT | prompts averaged for the ranking measure
WITH d AS (
    SELECT model, layer, head, count(*) AS n, avg(dla) AS mean_dla
    FROM dla WHERE component = 'head'
    GROUP BY model, layer, head
),
a AS (
    SELECT model, layer, head, count(*) AS n, avg(logit_diff) AS mean_logit_diff
    FROM ablation WHERE unit_kind = 'head' AND mode = CAST($mode AS VARCHAR)
    GROUP BY model, layer, head
),
j AS (
    SELECT d.model, d.layer, d.head, d.mean_dla, d.n AS n_dla, a.mean_logit_diff, a.n AS n_ablation
    FROM d LEFT JOIN a ON a.model = d.model AND a.layer = d.layer AND a.head = d.head
),
r AS (
    SELECT model, 'ablation' AS measure, rank() OVER (PARTITION BY model ORDER BY mean_logit_diff DESC) AS rank,
           layer, head, mean_logit_diff, mean_dla, n_ablation AS n_prompts
    FROM j WHERE mean_logit_diff IS NOT NULL
    UNION ALL
    SELECT model, 'dla' AS measure, rank() OVER (PARTITION BY model ORDER BY mean_dla DESC) AS rank,
           layer, head, mean_logit_diff, mean_dla, n_dla AS n_prompts
    FROM j
)
SELECT r.model, r.measure, r.rank, r.layer, r.head, m.n_layers, r.layer / m.n_layers AS rel_depth,
       r.mean_logit_diff, r.mean_dla, r.n_prompts
FROM r JOIN models m ON m.model = r.model
WHERE r.rank <= CAST($top AS INTEGER)
ORDER BY r.model, r.measure, r.rank, r.layer, r.head
