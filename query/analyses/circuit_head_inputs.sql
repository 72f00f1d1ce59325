-- name: circuit_head_inputs
-- description: The heads whose query, key or value inputs matter most: per pair kind, receiving
--   head and input kind (q: query head; k, v: KV head), the sum over incoming edges of the score
--   (the node-level attribution of that input) and of |score|, each averaged over the pairs of the
--   kind, ranked by the mean |score| sum. Empty unless extracted with --circuits.
-- param: method VARCHAR {eap,eap_ig_inputs,eap_ig_activations} = 'eap_ig_inputs' | attribution method
-- param: metric VARCHAR {ld,kl} = 'ld' | metric
-- param: top INTEGER = 10 | inputs kept per pair kind
-- column: pair_kind VARCHAR | 'template' or 'word'
-- column: layer INTEGER | the receiving head's layer
-- column: head INTEGER | query head (q) or KV head (k, v)
-- column: input_kind VARCHAR | q, k or v
-- column: n_pairs BIGINT | pairs averaged
-- column: mean_in_score DOUBLE | mean over pairs of the sum of incoming edge scores
-- column: mean_in_abs DOUBLE | mean over pairs of the sum of incoming |score|
-- column: input_rank BIGINT | rank by mean_in_abs within the pair kind (1 = largest; ties by layer, head, kind)
WITH per_pair AS (
    SELECT pair_kind, clean_prompt, down_layer AS layer, down_head AS head, input_kind,
           sum(score::DOUBLE) AS s, sum(abs(score::DOUBLE)) AS a
    FROM circuit_edges
    WHERE method = CAST($method AS VARCHAR) AND metric = CAST($metric AS VARCHAR)
      AND input_kind IN ('q', 'k', 'v')
    GROUP BY pair_kind, clean_prompt, down_layer, down_head, input_kind
),
m AS (
    SELECT pair_kind, layer, head, input_kind, count(*) AS n_pairs, avg(s) AS mean_in_score, avg(a) AS mean_in_abs
    FROM per_pair GROUP BY pair_kind, layer, head, input_kind
),
r AS (SELECT *, row_number() OVER (PARTITION BY pair_kind ORDER BY mean_in_abs DESC, layer, head, input_kind)
                AS input_rank FROM m)
SELECT * FROM r WHERE input_rank <= CAST($top AS INTEGER)
ORDER BY pair_kind, input_rank
