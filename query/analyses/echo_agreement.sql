-- name: echo_agreement
-- description: Per word, whether every template gives the same answer: same top-1 token,
--   same greedy continuation, and how many templates echo the word.
-- column: word VARCHAR | the word
-- column: n_templates BIGINT | prompts (templates) for this word
-- column: same_top1 BOOLEAN | every template has the same top-1 token at the last position
-- column: same_generation BOOLEAN | every template has the same greedy continuation
-- column: n_echo_correct BIGINT | templates whose continuation starts with the word
-- column: top1_texts VARCHAR[] | top-1 token text per template, in template order
-- column: generations VARCHAR[] | continuation per template, in template order
SELECT word,
       count(*) AS n_templates,
       count(DISTINCT top1_id) = 1 AS same_top1,
       count(DISTINCT generation) = 1 AS same_generation,
       count(*) FILTER (WHERE echo_correct) AS n_echo_correct,
       list(top1_text ORDER BY template_index) AS top1_texts,
       list(generation ORDER BY template_index) AS generations
FROM prompts
GROUP BY word
ORDER BY word
