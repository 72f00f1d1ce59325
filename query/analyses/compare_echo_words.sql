-- name: compare_echo_words
-- description: Per word and template (comparison): how many models echo it (the continuation
--   starts with the word) and which; words the models disagree on come first.
-- column: word VARCHAR | the word
-- column: template_index INTEGER | template number
-- column: n_models BIGINT | models with a prompt for this word and template
-- column: n_echo BIGINT | of those, models whose continuation starts with the word
-- column: models_echo VARCHAR | their labels (comma-separated)
-- column: models_not_echo VARCHAR | the other models' labels
-- column: agree BOOLEAN | every model does the same (all echo or none does)
SELECT word, template_index,
       count(DISTINCT model) AS n_models,
       count(DISTINCT model) FILTER (WHERE echo_correct) AS n_echo,
       string_agg(DISTINCT model, ', ' ORDER BY model) FILTER (WHERE echo_correct) AS models_echo,
       string_agg(DISTINCT model, ', ' ORDER BY model) FILTER (WHERE echo_correct IS NOT TRUE) AS models_not_echo,
       count(DISTINCT model) FILTER (WHERE echo_correct) IN (0, count(DISTINCT model)) AS agree
FROM prompts
GROUP BY word, template_index
ORDER BY agree, template_index, word
