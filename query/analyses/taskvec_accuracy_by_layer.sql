-- name: taskvec_accuracy_by_layer
-- description: The Hendel/Todd curve: echo accuracy on held-out words of each task-vector and
--   function-vector intervention by the boundary it is put in at, beside the clean baselines: the
--   destination prompt run as it is (zero-shot or neutral: the floor) and the prompt the vector
--   carries (demonstrations or the repeat instruction: the ceiling). Empty without --task-vectors.
-- param: method VARCHAR {task_vector,function_vector} = NULL | only this method (NULL: both)
-- column: method VARCHAR | 'task_vector' or 'function_vector'
-- column: source_kind VARCHAR | the prompt kind the vector is built from ('demo', 'repeat'; function vectors: 'demo')
-- column: dest_kind VARCHAR | the prompt it is put into ('zero_shot', 'neutral')
-- column: k INTEGER | function vectors: top-k heads summed (NULL for task vectors)
-- column: boundary INTEGER | residual boundary the vector is written at (0 = embeddings, l = input of block l)
-- column: layer INTEGER | boundary - 1 (as in the resid view)
-- column: n_words BIGINT | held-out words
-- column: accuracy DOUBLE | share of held-out words whose intervened top-1 is echo-correct
-- column: mean_target_prob DOUBLE | mean P(target) after the intervention
-- column: dest_clean_accuracy DOUBLE | clean echo accuracy of the destination prompt (the floor)
-- column: source_clean_accuracy DOUBLE | clean echo accuracy of the source prompt (the ceiling)
WITH base AS (
    SELECT kind, avg(CAST(correct AS DOUBLE)) AS acc FROM taskvec_clean GROUP BY kind
),
runs AS (
    SELECT method, coalesce(source_kind, 'demo') AS source_kind, dest_kind, k, boundary, layer,
           count(*) AS n_words, avg(CAST(correct AS DOUBLE)) AS accuracy,
           avg(CAST(target_prob AS DOUBLE)) AS mean_target_prob
    FROM taskvec_interventions
    WHERE method IN ('task_vector', 'function_vector')
      AND (CAST($method AS VARCHAR) IS NULL OR method = CAST($method AS VARCHAR))
    GROUP BY ALL
)
SELECT r.method, r.source_kind, r.dest_kind, r.k, r.boundary, r.layer, r.n_words, r.accuracy,
       r.mean_target_prob, d.acc AS dest_clean_accuracy, s.acc AS source_clean_accuracy
FROM runs r
LEFT JOIN base d ON d.kind = r.dest_kind
LEFT JOIN base s ON s.kind = r.source_kind
ORDER BY r.method, r.source_kind, r.dest_kind, r.k NULLS FIRST, r.boundary
