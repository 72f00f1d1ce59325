-- name: taskvec_steering
-- description: The steering response curve: echo accuracy and mean target probability on
--   held-out words by steering coefficient, per boundary, in both directions (+c * SV on echo
--   prompts, towards repeat; -c * SV on repeat prompts, towards echo; SV = mean repeat - mean echo
--   last-position residual of the train words) and both position modes (the last token, or every
--   token from the verb on), beside the clean accuracy of the prompt steered and of the one steered
--   towards. Empty without --task-vectors.
-- param: boundary INTEGER = NULL | only this boundary (NULL: every one)
-- param: position_mode VARCHAR {last,from_verb} = NULL | only this position mode (NULL: both)
-- column: direction VARCHAR | 'echo->repeat' (steering echo prompts) or 'repeat->echo'
-- column: dest_kind VARCHAR | the prompt steered ('echo' or 'repeat')
-- column: position_mode VARCHAR | 'last' or 'from_verb'
-- column: boundary INTEGER | residual boundary steered
-- column: layer INTEGER | boundary - 1
-- column: coefficient DOUBLE | signed coefficient of SV (negative: towards echo)
-- column: n_words BIGINT | held-out words
-- column: accuracy DOUBLE | share of words whose steered top-1 is echo-correct
-- column: mean_target_prob DOUBLE | mean P(target) after steering
-- column: mean_kl DOUBLE | mean KL(clean || steered), nats
-- column: dest_clean_accuracy DOUBLE | clean echo accuracy of the prompt steered
-- column: towards_clean_accuracy DOUBLE | clean echo accuracy of the prompt steered towards
WITH base AS (
    SELECT kind, avg(CAST(correct AS DOUBLE)) AS acc FROM taskvec_clean GROUP BY kind
),
runs AS (
    SELECT dest_kind || '->' || source_kind AS direction, dest_kind, source_kind, position_mode, boundary, layer,
           coefficient, count(*) AS n_words, avg(CAST(correct AS DOUBLE)) AS accuracy,
           avg(CAST(target_prob AS DOUBLE)) AS mean_target_prob, avg(CAST(kl AS DOUBLE)) AS mean_kl
    FROM taskvec_interventions
    WHERE method = 'steer'
      AND (CAST($boundary AS INTEGER) IS NULL OR boundary = CAST($boundary AS INTEGER))
      AND (CAST($position_mode AS VARCHAR) IS NULL OR position_mode = CAST($position_mode AS VARCHAR))
    GROUP BY ALL
)
SELECT r.direction, r.dest_kind, r.position_mode, r.boundary, r.layer, r.coefficient, r.n_words, r.accuracy,
       r.mean_target_prob, r.mean_kl, d.acc AS dest_clean_accuracy, t.acc AS towards_clean_accuracy
FROM runs r
LEFT JOIN base d ON d.kind = r.dest_kind
LEFT JOIN base t ON t.kind = r.source_kind
ORDER BY r.direction, r.position_mode, r.boundary, abs(r.coefficient)
