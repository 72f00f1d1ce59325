-- name: validation_summary
-- description: The invariants checked on every prompt: largest error of each and how many
--   prompts pass it.
-- column: invariant VARCHAR | invariant name
-- column: n_prompts BIGINT | prompts checked
-- column: n_passed BIGINT | prompts within tolerance
-- column: max_abs_err DOUBLE | largest absolute error over the prompts
-- column: max_rel_err DOUBLE | largest relative error (to max(1, |reference|))
-- column: tolerance DOUBLE | allowed relative error
SELECT invariant,
       count(*) AS n_prompts,
       count(*) FILTER (WHERE passed) AS n_passed,
       max(max_abs_err) AS max_abs_err,
       max(rel_err) AS max_rel_err,
       max(tolerance) AS tolerance
FROM validation
GROUP BY invariant
ORDER BY invariant
