-- name: massive_activations
-- description: Massive activations (Sun et al. 2024): residual values above abs_min and above ratio_min
--   times the median |value| of the boundary's whole hidden state (every position and dimension, as
--   Sun et al. define it); per dimension and position, from which layer on, in how many prompts,
--   how large. Among each (boundary, position)'s 8 largest |values| (resid_top).
-- param: abs_min DOUBLE = 100 | |value| must exceed this
-- param: ratio_min DOUBLE = 1000 | and this many times the boundary's median |value|
-- column: dim INTEGER | residual dimension
-- column: position INTEGER | token position
-- column: role_name VARCHAR | its role ('first' = position 0)
-- column: token_text VARCHAR | the token there (of the first prompt listed)
-- column: first_layer INTEGER | first residual layer (boundary - 1; -1 = embeddings) where it is massive
-- column: last_layer INTEGER | last such layer
-- column: n_layers INTEGER | layers where it is massive (in some prompt)
-- column: n_prompts INTEGER | prompts where it is massive at some layer
-- column: max_abs DOUBLE | largest |value|
-- column: max_ratio DOUBLE | largest |value| / median |value| of the whole hidden state
-- column: max_ratio_own DOUBLE | largest |value| / median |value| of its own position's vector
WITH m AS (
    SELECT r.prompt, r.layer, r.position, r.dim, abs(r.value) AS a,
           abs(r.value) / nullif(r.median_abs_all, 0) AS ratio,
           abs(r.value) / nullif(r.median_abs, 0) AS ratio_own
    FROM resid_top r
    WHERE abs(r.value) > $abs_min AND abs(r.value) > $ratio_min * r.median_abs_all
)
SELECT m.dim, m.position, any_value(t.role_name) AS role_name,
       arg_min(t.token_text, m.prompt) AS token_text,
       min(m.layer)::INTEGER AS first_layer, max(m.layer)::INTEGER AS last_layer,
       count(DISTINCT m.layer)::INTEGER AS n_layers, count(DISTINCT m.prompt)::INTEGER AS n_prompts,
       max(m.a)::DOUBLE AS max_abs, max(m.ratio)::DOUBLE AS max_ratio, max(m.ratio_own)::DOUBLE AS max_ratio_own
FROM m JOIN tokens t ON t.prompt = m.prompt AND t.position = m.position
GROUP BY m.dim, m.position ORDER BY n_prompts DESC, max_abs DESC
