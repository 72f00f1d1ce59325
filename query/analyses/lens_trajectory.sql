-- name: lens_trajectory
-- description: Logit-lens top-k tokens at every layer for chosen prompts, with each layer's
--   distance to the emergence layer (layers_before_emergence = 1 shows the intermediate
--   token one layer before the answer, e.g. a non-English token).
-- param: word VARCHAR = NULL | only prompts of this word (NULL: every word)
-- param: template_index INTEGER = NULL | only this template (NULL: every template)
-- param: k INTEGER = 5 | top-k tokens per layer to keep
-- column: prompt INTEGER | prompt index
-- column: word VARCHAR | the word
-- column: template_index INTEGER | template number
-- column: layer INTEGER | residual after block `layer` (-1 = embeddings)
-- column: boundary INTEGER | residual boundary (layer + 1)
-- column: k INTEGER | rank of the token at this layer (0 = top-1)
-- column: token_id INTEGER | token id
-- column: token_text VARCHAR | token text
-- column: prob FLOAT | logit-lens probability
-- column: logit FLOAT | logit-lens logit
-- column: is_target BOOLEAN | the token is the target token
-- column: target_rank INTEGER | rank of the target at this layer
-- column: emergence_layer INTEGER | the prompt's emergence layer (NULL: never)
-- column: layers_before_emergence INTEGER | emergence_layer - layer
SELECT t.prompt, p.word, p.template_index, t.layer, t.boundary, t.k, t.token_id, t.token_text,
       t.prob, t.logit, t.token_id = p.target_id AS is_target, l.target_rank,
       e.emergence_layer, e.emergence_layer - t.layer AS layers_before_emergence
FROM lens_topk t
JOIN prompts p ON p.prompt = t.prompt
JOIN logit_lens l ON l.prompt = t.prompt AND l.boundary = t.boundary
JOIN emergence e ON e.prompt = t.prompt
WHERE t.k < CAST($k AS INTEGER)
  AND (CAST($word AS VARCHAR) IS NULL OR p.word = CAST($word AS VARCHAR))
  AND (CAST($template_index AS INTEGER) IS NULL OR p.template_index = CAST($template_index AS INTEGER))
ORDER BY t.prompt, t.layer, t.k
