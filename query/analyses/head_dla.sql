-- name: head_dla
-- description: Direct logit attribution of every head of one block to the target, per prompt
--   (default block: each prompt's emergence layer), ranked within the prompt.
-- param: layer INTEGER = NULL | block index; NULL = each prompt's emergence layer (prompts with no emergence block, NULL or -1, are left out: give a layer to include every prompt)
-- column: prompt INTEGER | prompt index
-- column: word VARCHAR | the word
-- column: template_index INTEGER | template number
-- column: layer INTEGER | block whose heads these are
-- column: head INTEGER | head index
-- column: dla FLOAT | the head's direct contribution to the target logit
-- column: dla_rank INTEGER | 1 = largest DLA among this prompt's heads at this layer
-- column: emergence_layer INTEGER | the prompt's emergence layer
WITH sel AS (
    SELECT p.prompt, p.word, p.template_index, e.emergence_layer,
           coalesce(CAST($layer AS INTEGER), e.emergence_layer) AS layer
    FROM prompts p JOIN emergence e ON e.prompt = p.prompt
)
SELECT s.prompt, s.word, s.template_index, s.layer, d.head, d.dla,
       CAST(rank() OVER (PARTITION BY s.prompt ORDER BY d.dla DESC) AS INTEGER) AS dla_rank,
       s.emergence_layer
FROM sel s
JOIN dla d ON d.prompt = s.prompt AND d.layer = s.layer AND d.component = 'head'
ORDER BY s.prompt, d.head
