-- name: circuit_agreement
-- description: Does the template circuit use the copy circuit's edges? Per clean prompt that has
--   both a template pair and a word pair: the Jaccard index of their top edges by |score| (ties by
--   edge index) and the Spearman rank correlation of their scores over every edge (average ranks
--   for ties). Empty unless extracted with --circuits (both kinds).
-- param: method VARCHAR {eap,eap_ig_inputs,eap_ig_activations} = 'eap_ig_inputs' | attribution method
-- param: metric VARCHAR {ld,kl} = 'ld' | metric
-- param: top INTEGER = 20 | edges in each top set
-- column: clean_prompt INTEGER | the prompt both pairs start from
-- column: word VARCHAR | its word
-- column: n_top INTEGER | edges in each top set
-- column: n_shared BIGINT | edges in both top sets
-- column: jaccard DOUBLE | n_shared / edges in either top set
-- column: spearman DOUBLE | rank correlation of the two pairs' scores over every edge
WITH s AS (
    SELECT pair_kind, clean_prompt, edge, score::DOUBLE AS score
    FROM circuit_scores
    WHERE method = CAST($method AS VARCHAR) AND metric = CAST($metric AS VARCHAR)
),
both_kinds AS (
    SELECT clean_prompt FROM s GROUP BY clean_prompt HAVING count(DISTINCT pair_kind) = 2
),
ranked AS (
    SELECT s.*,
           row_number() OVER (PARTITION BY pair_kind, s.clean_prompt ORDER BY abs(score) DESC, edge) AS top_rank,
           rank() OVER (PARTITION BY pair_kind, s.clean_prompt ORDER BY score)
             + (count(*) OVER (PARTITION BY pair_kind, s.clean_prompt, score) - 1) / 2.0 AS avg_rank
    FROM s JOIN both_kinds USING (clean_prompt)
),
pairs AS (
    SELECT t.clean_prompt, t.edge, t.avg_rank AS rt, w.avg_rank AS rw,
           t.top_rank <= CAST($top AS INTEGER) AS in_t, w.top_rank <= CAST($top AS INTEGER) AS in_w
    FROM ranked t JOIN ranked w ON w.clean_prompt = t.clean_prompt AND w.edge = t.edge
    WHERE t.pair_kind = 'template' AND w.pair_kind = 'word'
)
SELECT p.clean_prompt, any_value(c.word) AS word, CAST($top AS INTEGER) AS n_top,
       count(*) FILTER (WHERE in_t AND in_w) AS n_shared,
       (count(*) FILTER (WHERE in_t AND in_w))::DOUBLE / count(*) FILTER (WHERE in_t OR in_w) AS jaccard,
       corr(rt, rw) AS spearman
FROM pairs p JOIN circuit_pairs c ON c.clean_prompt = p.clean_prompt AND c.pair_kind = 'word'
GROUP BY p.clean_prompt
ORDER BY p.clean_prompt
