-- name: circuit_paths
-- description: Paths from the word's embedding (node input) to the logits through edges whose
--   score, averaged over the pairs of a kind, is at least the threshold in absolute value: a
--   recursive walk over the averaged edge graph. A path continues from the node whose input an
--   edge reaches (a key or value input of KV head g continues from every query head sharing g).
--   Each path is listed as its edges 'sender->receiver', with its weakest link. Empty unless
--   extracted with --circuits; a low threshold can list very many paths (raise it, or use top).
-- param: threshold DOUBLE = 0.1 | minimum |mean score| of every edge on the path
-- param: method VARCHAR {eap,eap_ig_inputs,eap_ig_activations} = 'eap_ig_inputs' | attribution method
-- param: metric VARCHAR {ld,kl} = 'ld' | metric
-- param: top INTEGER = 50 | paths kept per pair kind, strongest weakest link first
-- column: pair_kind VARCHAR | 'template' or 'word'
-- column: path VARCHAR | the path's edges, 'sender->receiver' joined by ', '
-- column: n_edges INTEGER | edges on the path
-- column: weakest DOUBLE | the smallest |mean score| on the path
-- column: total DOUBLE | the sum of the path's mean scores
WITH RECURSIVE shape AS (
    SELECT count(DISTINCT down_head) FILTER (WHERE input_kind = 'q')
               // greatest(count(DISTINCT down_head) FILTER (WHERE input_kind = 'k'), 1) AS grp
    FROM circuit_graph
),
m AS (
    SELECT pair_kind, edge, avg(score::DOUBLE) AS s
    FROM circuit_scores
    WHERE method = CAST($method AS VARCHAR) AND metric = CAST($metric AS VARCHAR)
    GROUP BY pair_kind, edge
),
strong AS (  -- the kept edges, each with the node(s) it continues from
    SELECT m.pair_kind, g.upstream, g.downstream, m.s,
           CASE WHEN g.input_kind IN ('q', 'k', 'v') THEN 'a' || g.down_layer || '.h'
                ELSE NULL END AS head_prefix,
           g.input_kind, g.down_head
    FROM m JOIN circuit_graph g USING (edge)
    WHERE abs(m.s) >= CAST($threshold AS DOUBLE)
),
hop AS (  -- edge -> the node the walk continues from (NULL node: the logits)
    SELECT pair_kind, upstream, downstream, s,
           CASE WHEN input_kind = 'q' THEN head_prefix || down_head
                WHEN input_kind IN ('k', 'v') THEN head_prefix || (down_head * (SELECT grp FROM shape) + u.i)
                WHEN input_kind = 'mlp' THEN downstream END AS next_node
    FROM strong
    LEFT JOIN (SELECT unnest(range((SELECT grp FROM shape)::BIGINT)) AS i) u
           ON strong.input_kind IN ('k', 'v') OR u.i = 0
),
walk(pair_kind, node, path, n_edges, weakest, total) AS (
    SELECT pair_kind, next_node, upstream || '->' || downstream, 1, abs(s), s
    FROM hop WHERE upstream = 'input'
    UNION ALL
    SELECT w.pair_kind, h.next_node, w.path || ', ' || h.upstream || '->' || h.downstream, w.n_edges + 1,
           least(w.weakest, abs(h.s)), w.total + h.s
    FROM walk w JOIN hop h ON h.pair_kind = w.pair_kind AND h.upstream = w.node
),
done AS (
    SELECT DISTINCT pair_kind, path, n_edges, weakest, total FROM walk WHERE node IS NULL
),
r AS (SELECT *, row_number() OVER (PARTITION BY pair_kind ORDER BY weakest DESC, path) AS k FROM done)
SELECT pair_kind, path, n_edges::INTEGER AS n_edges, weakest, total
FROM r WHERE k <= CAST($top AS INTEGER)
ORDER BY pair_kind, weakest DESC, path
