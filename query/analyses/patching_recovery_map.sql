-- name: patching_recovery_map
-- description: Layer x position map of normalised recovery for one patch kind, per pair direction:
--   averaged over words (word = NULL) or for one word. Positions are counted from the
--   destination's end (from_end 0 = last), so words of different token lengths line up. Empty
--   unless extracted with --patching.
-- param: kind VARCHAR {resid,attn,mlp} = 'resid' | what is patched at (layer, position)
-- param: word VARCHAR = NULL | one word; NULL = the mean over every word
-- param: direction INTEGER = NULL | 0 (template a into b), 1 (b into a); NULL = both
-- column: pair VARCHAR | template pair 'a-b'
-- column: direction INTEGER | 0: a into b; 1: b into a
-- column: kind VARCHAR | patch kind
-- column: layer INTEGER | block index (resid: boundary - 1, -1 = embeddings)
-- column: from_end INTEGER | destination positions before the last (0 = last)
-- column: token VARCHAR | the destination token there when every word has the same one, else '{role}' (e.g. the word itself)
-- column: role VARCHAR | its role
-- column: n_words BIGINT | words averaged
-- column: mean_recovery DOUBLE | mean normalised recovery (0 = destination, 1 = source)
-- column: pooled_recovery DOUBLE | recovery weighted by each word's |LD source - LD dest| (= sum of ld_change oriented by the gap's sign / sum of |gap|): not swayed by a word whose two prompts' LDs nearly agree, as the plain mean is
-- column: min_abs_ld_gap DOUBLE | smallest |LD source - LD dest| among the words (a small one makes that word's recovery noisy)
-- column: mean_ld_change DOUBLE | mean change of the logit difference (ld_change; LD's tokens are per word: patching_pairs)
-- column: mean_attribution_recovery DOUBLE | attribution patching's estimate of mean_recovery
-- column: mean_kl_source DOUBLE | mean KL(source || patched)
SELECT pair, direction, kind, layer, from_end,
       CASE WHEN count(DISTINCT dst_token) = 1 THEN min(dst_token) ELSE '{' || mode(dst_role) || '}' END AS token,
       mode(dst_role) AS role,
       count(*) AS n_words,
       avg(recovery) AS mean_recovery,
       sum(ld_change * sign(ld_gap)) / sum(abs(ld_gap)) AS pooled_recovery,
       min(abs(ld_gap))::DOUBLE AS min_abs_ld_gap,
       avg(ld_change) AS mean_ld_change,
       avg(attribution_recovery) AS mean_attribution_recovery,
       avg(kl_source) AS mean_kl_source
FROM (SELECT p.*, q.ld_source - q.ld_dest AS ld_gap
      FROM patching p JOIN patching_pairs q USING (pair, word, direction))
WHERE kind = CAST($kind AS VARCHAR)
  AND (CAST($word AS VARCHAR) IS NULL OR word = CAST($word AS VARCHAR))
  AND (CAST($direction AS INTEGER) IS NULL OR direction = CAST($direction AS INTEGER))
GROUP BY pair, direction, kind, layer, from_end
ORDER BY pair, direction, layer, from_end DESC
