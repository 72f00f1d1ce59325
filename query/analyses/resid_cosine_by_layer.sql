-- name: resid_cosine_by_layer
-- description: Cosine similarity of the last-position residual between two templates for the
--   same word, summarised over words per layer (the study saw it fall from 1 to 0.87).
-- param: template_a INTEGER = 0 | first template
-- param: template_b INTEGER = 1 | second template
-- column: layer INTEGER | residual after block `layer` (-1 = embeddings)
-- column: n_words BIGINT | words with both templates
-- column: mean_cosine DOUBLE | mean over words
-- column: min_cosine DOUBLE | smallest
-- column: max_cosine DOUBLE | largest
WITH pairs AS (
    SELECT a.prompt AS prompt_a, b.prompt AS prompt_b
    FROM prompts a JOIN prompts b ON b.word = a.word
    WHERE a.template_index = CAST($template_a AS INTEGER)
      AND b.template_index = CAST($template_b AS INTEGER)
)
SELECT ra.layer, count(*) AS n_words,
       avg(array_cosine_similarity(ra.vec, rb.vec)) AS mean_cosine,
       min(array_cosine_similarity(ra.vec, rb.vec))::DOUBLE AS min_cosine,
       max(array_cosine_similarity(ra.vec, rb.vec))::DOUBLE AS max_cosine
FROM pairs pr
JOIN resid ra ON ra.prompt = pr.prompt_a AND ra.role = 4
JOIN resid rb ON rb.prompt = pr.prompt_b AND rb.role = 4 AND rb.boundary = ra.boundary
GROUP BY ra.layer
ORDER BY ra.layer
