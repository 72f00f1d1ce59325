-- name: emergence_layer
-- description: Per prompt, the first layer from which the target token stays top-1 under the
--   logit lens through the last layer (-1 = already at the embeddings; NULL = the model's
--   final top-1 is not the target).
-- column: prompt INTEGER | prompt index
-- column: word VARCHAR | the word
-- column: template_index INTEGER | template number
-- column: target_text VARCHAR | target token text
-- column: emergence_layer INTEGER | first layer from which the target stays rank 0 (NULL: never)
-- column: echo_correct BOOLEAN | the continuation starts with the word
SELECT p.prompt, p.word, p.template_index, p.target_text, e.emergence_layer, p.echo_correct
FROM prompts p
JOIN emergence e ON e.prompt = p.prompt
ORDER BY p.prompt
