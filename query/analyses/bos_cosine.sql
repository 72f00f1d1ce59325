-- name: bos_cosine
-- description: Cosine similarity of the position-0 residual stream across every pair of
--   prompts, per layer (identical prompts' first tokens give 1: causal masking means position
--   0 sees only itself).
-- column: layer INTEGER | residual after block `layer` (-1 = embeddings)
-- column: boundary INTEGER | residual boundary
-- column: n_pairs BIGINT | prompt pairs compared
-- column: n_first_tokens BIGINT | distinct token ids at position 0
-- column: min_cosine DOUBLE | smallest pairwise cosine
-- column: mean_cosine DOUBLE | mean pairwise cosine
-- column: max_cosine DOUBLE | largest pairwise cosine
WITH r AS (
    SELECT r.prompt, r.boundary, r.layer, r.vec, t.token_id
    FROM resid r JOIN tokens t ON t.prompt = r.prompt AND t.position = 0
    WHERE r.position = 0
),
c AS (
    SELECT a.layer, a.boundary, a.token_id AS ta, b.token_id AS tb,
           CAST(array_cosine_similarity(a.vec, b.vec) AS DOUBLE) AS cosine
    FROM r a JOIN r b ON b.boundary = a.boundary AND a.prompt < b.prompt
)
SELECT layer, boundary, count(*) AS n_pairs,
       (SELECT count(DISTINCT token_id) FROM r) AS n_first_tokens,
       min(cosine) AS min_cosine, avg(cosine) AS mean_cosine, max(cosine) AS max_cosine
FROM c
GROUP BY layer, boundary
ORDER BY boundary
