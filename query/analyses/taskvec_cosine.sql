-- name: taskvec_cosine
-- description: The study's falling cosine, explained or not: per boundary, the cosine of each
--   method's vector (the demo and repeat task vectors, the function vectors) with the
--   template-difference direction SV = mean repeat - mean echo last-position residual of the train
--   words, beside the cosine between the two templates' mean residuals (train words, the study's
--   vectors.h5) and the warehouse's own per-word cosine of the two templates' last-position
--   residuals averaged over words (resid_cosine_templates). Empty without --task-vectors.
-- param: template_a INTEGER = 0 | the warehouse's repeat template (for the per-word cosine)
-- param: template_b INTEGER = 1 | the warehouse's echo template
-- column: vector VARCHAR | 'tv_demo', 'tv_repeat', 'fv_5', 'fv_10', 'fv_20' (the sizes extracted)
-- column: boundary INTEGER | residual boundary (0 = embeddings)
-- column: layer INTEGER | boundary - 1
-- column: cosine_with_steer DOUBLE | cosine of the vector with SV at this boundary (NULL where SV = 0)
-- column: norm DOUBLE | the vector's norm
-- column: steer_norm DOUBLE | the norm of SV at this boundary
-- column: template_mean_cosine DOUBLE | cosine of the mean repeat and mean echo residuals (train words)
-- column: template_word_cosine DOUBLE | mean over the warehouse's words of the per-word template cosine
WITH v AS (SELECT * FROM taskvec_vectors),
pairs AS (
    SELECT a.prompt AS prompt_a, b.prompt AS prompt_b
    FROM prompts a JOIN prompts b ON b.word = a.word
    WHERE a.template_index = CAST($template_a AS INTEGER) AND b.template_index = CAST($template_b AS INTEGER)
),
words AS (
    SELECT ra.boundary, avg(CAST(array_cosine_similarity(ra.vec, rb.vec) AS DOUBLE)) AS template_word_cosine
    FROM pairs pr
    JOIN resid ra ON ra.prompt = pr.prompt_a AND ra.role = 4
    JOIN resid rb ON rb.prompt = pr.prompt_b AND rb.role = 4 AND rb.boundary = ra.boundary
    GROUP BY ra.boundary
)
SELECT m.vector, m.boundary, m.layer, m.cosine AS cosine_with_steer, m.norm, s.norm AS steer_norm,
       t.cosine AS template_mean_cosine, w.template_word_cosine
FROM v m
JOIN v s ON s.vector = 'steer' AND s.boundary = m.boundary
JOIN v t ON t.vector = 'mean_repeat_vs_echo' AND t.boundary = m.boundary
LEFT JOIN words w ON w.boundary = m.boundary
WHERE m.vector NOT IN ('steer', 'mean_repeat_vs_echo')
ORDER BY m.vector, m.boundary
