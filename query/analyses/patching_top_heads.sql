-- name: patching_top_heads
-- description: Heads ranked by mean recovery when patched at every aligned position after the
--   shared prefix (head_all), per pair direction, with their attribution estimate, and beside
--   them the same head's rank by mean DLA and by mean zero-ablation effect, both over the
--   destination prompts and to their target token (NULL without ablation data). Ranks are of the
--   signed means, descending, over every head of the model (ties share the smallest rank). Do the
--   heads that matter for ablation matter for patching? (They measure different things: zero
--   ablation removes the head at every position and reads the target logit; patching swaps it at
--   the positions after the prefix and reads LD.)
-- param: direction INTEGER = NULL | 0 (template a into b), 1 (b into a); NULL = both
-- param: top INTEGER = 10 | heads kept per pair direction
-- column: pair VARCHAR | template pair 'a-b'
-- column: direction INTEGER | 0: a into b; 1: b into a
-- column: layer INTEGER | block index
-- column: head INTEGER | head index
-- column: n_words BIGINT | words averaged
-- column: mean_recovery DOUBLE | mean normalised recovery of the head patched at every differing position
-- column: mean_attribution_recovery DOUBLE | attribution patching's estimate of it
-- column: patching_rank BIGINT | rank by mean_recovery within the pair direction (1 = largest)
-- column: mean_dla DOUBLE | mean DLA of the head to the destination prompts' targets
-- column: dla_rank BIGINT | rank of mean_dla over every head (1 = largest)
-- column: mean_ablation DOUBLE | mean zero-ablation effect on the destination prompts (clean - ablated target logit; the ablation grid's positions, all by default)
-- column: ablation_rank BIGINT | rank of mean_ablation over every ablated head (1 = largest)
WITH pat AS (
    SELECT pair, direction, layer, head, count(*) AS n_words, avg(recovery) AS mean_recovery,
           avg(attribution_recovery) AS mean_attribution_recovery
    FROM patching
    WHERE kind = 'head_all'
      AND (CAST($direction AS INTEGER) IS NULL OR direction = CAST($direction AS INTEGER))
    GROUP BY pair, direction, layer, head
),
dest AS (SELECT DISTINCT pair, direction, dest_prompt FROM patching),
dla_r AS (
    SELECT d.pair, d.direction, x.layer, x.head, avg(x.dla) AS mean_dla
    FROM dest d JOIN dla x ON x.prompt = d.dest_prompt AND x.component = 'head'
    GROUP BY d.pair, d.direction, x.layer, x.head
),
abl_r AS (
    SELECT d.pair, d.direction, a.layer, a.head, avg(a.logit_diff) AS mean_ablation
    FROM dest d JOIN ablation a ON a.prompt = d.dest_prompt AND a.unit_kind = 'head' AND a.mode = 'zero'
    GROUP BY d.pair, d.direction, a.layer, a.head
),
ranked AS (
    SELECT p.*, rank() OVER (PARTITION BY p.pair, p.direction ORDER BY p.mean_recovery DESC) AS patching_rank,
           x.mean_dla, rank() OVER (PARTITION BY p.pair, p.direction ORDER BY x.mean_dla DESC) AS dla_rank,
           a.mean_ablation,
           CASE WHEN a.mean_ablation IS NULL THEN NULL
                ELSE rank() OVER (PARTITION BY p.pair, p.direction ORDER BY a.mean_ablation DESC NULLS LAST) END
               AS ablation_rank
    FROM pat p
    LEFT JOIN dla_r x USING (pair, direction, layer, head)
    LEFT JOIN abl_r a USING (pair, direction, layer, head)
)
SELECT pair, direction, layer, head, n_words, mean_recovery, mean_attribution_recovery, patching_rank,
       mean_dla, dla_rank, mean_ablation, ablation_rank
FROM ranked
WHERE patching_rank <= CAST($top AS INTEGER)
ORDER BY pair, direction, patching_rank, layer, head
