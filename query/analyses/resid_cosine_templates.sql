-- name: resid_cosine_templates
-- description: Cosine similarity of the last-position residual stream between two templates
--   for the same word, at every layer boundary.
-- param: template_a INTEGER = 0 | first template
-- param: template_b INTEGER = 1 | second template
-- param: word VARCHAR = NULL | only this word (NULL: every word with both templates)
-- column: word VARCHAR | the word
-- column: layer INTEGER | residual after block `layer` (-1 = embeddings)
-- column: boundary INTEGER | residual boundary
-- column: cosine DOUBLE | cosine similarity of the two last-position residuals
-- column: prompt_a INTEGER | prompt of template_a
-- column: prompt_b INTEGER | prompt of template_b
WITH pairs AS (
    SELECT a.word, a.prompt AS prompt_a, b.prompt AS prompt_b
    FROM prompts a
    JOIN prompts b ON b.word = a.word
    WHERE a.template_index = CAST($template_a AS INTEGER)
      AND b.template_index = CAST($template_b AS INTEGER)
      AND (CAST($word AS VARCHAR) IS NULL OR a.word = CAST($word AS VARCHAR))
)
SELECT pr.word, ra.layer, ra.boundary,
       CAST(array_cosine_similarity(ra.vec, rb.vec) AS DOUBLE) AS cosine,
       pr.prompt_a, pr.prompt_b
FROM pairs pr
JOIN resid ra ON ra.prompt = pr.prompt_a AND ra.role = 4
JOIN resid rb ON rb.prompt = pr.prompt_b AND rb.role = 4 AND rb.boundary = ra.boundary
ORDER BY pr.word, ra.boundary
