-- name: patching_disagreements
-- description: The patches where attribution patching is furthest from the exact result
--   (largest |attribution - ld_change|), with what was patched and both numbers.
-- param: kind VARCHAR {resid,attn,mlp,head,head_all} = NULL | one patch kind; NULL = every kind
-- param: top INTEGER = 20 | rows kept
-- column: pair VARCHAR | template pair 'a-b'
-- column: word VARCHAR | the word
-- column: direction INTEGER | 0: a into b; 1: b into a
-- column: kind VARCHAR | patch kind
-- column: layer INTEGER | block index (resid: boundary - 1)
-- column: head INTEGER | head (NULL for blocks and the residual)
-- column: dst_pos INTEGER | destination position (NULL: every differing one)
-- column: dst_token VARCHAR | destination token there
-- column: ld_change DOUBLE | exact change of the logit difference
-- column: attribution DOUBLE | attribution patching's estimate
-- column: error DOUBLE | attribution - ld_change
-- column: recovery DOUBLE | exact normalised recovery
SELECT pair, word, direction, kind, layer, head, dst_pos, dst_token,
       ld_change::DOUBLE AS ld_change, attribution::DOUBLE AS attribution,
       (attribution - ld_change)::DOUBLE AS error, recovery::DOUBLE AS recovery
FROM patching
WHERE kind IN ('resid', 'attn', 'mlp', 'head', 'head_all')
  AND (CAST($kind AS VARCHAR) IS NULL OR kind = CAST($kind AS VARCHAR))
ORDER BY abs(attribution - ld_change) DESC
LIMIT CAST($top AS INTEGER)
