-- Hand-written differential corpus: every statement is run with narrowing on and with every
-- heavy view read whole (Warehouse(pushdown=False)); the answers must be equal.
-- Add a statement here whenever a query gives a wrong answer. Statements end with ';'.

-- the two reproductions of issue 8 (true answers also checked against h5py in test_corpus.py)
SELECT count(*) FROM resid r(p, layer) WHERE layer = 1;
SELECT (SELECT count(*) FROM resid WHERE layer = 1) a, (SELECT count(*) FROM query_table('resid')) b;
-- renamed columns that collide with the view's own names
SELECT count(*) FROM resid r(p, layer, boundary) WHERE r.layer = 0 AND r.p = 0;
SELECT count(*) FROM resid r(p, layer, boundary) WHERE boundary = -1 AND p = 0;
SELECT count(*) FROM resid AS r(p) WHERE p IN (0, 1) AND layer = 1;
SELECT count(*) FROM (SELECT * FROM resid) r(p, layer, boundary) WHERE r.layer = 0 AND r.p = 0;
SELECT count(*) FROM attention a(prompt, head, layer) WHERE layer = 1 AND head = 2;
SELECT count(*) FROM head_out h(layer, prompt) WHERE prompt = 1;
SELECT sum(x[1]) FROM resid r(a, b, c, d, e, x) WHERE c = 0 AND d = 4;
SELECT count(*) FROM head_out_all h(p, l, pos, r, hd) WHERE l = 2 AND hd = 1 AND r = 4;
-- query_table and query
SELECT count(*) FROM query_table('attention') WHERE layer = 2;
SELECT (SELECT count(*) FROM attention WHERE layer = 0) a, (SELECT count(*) FROM query_table('attention')) b;
SELECT count(*) FROM query('SELECT * FROM resid WHERE layer = 0') q WHERE position = 1;
SELECT count(*) FROM query_table(['resid']) WHERE boundary = 2;
-- the same view twice with different predicates
SELECT count(*) FROM resid a JOIN resid b USING (prompt, position) WHERE a.layer = 0 AND b.layer = 2;
SELECT count(*) FROM resid a JOIN resid b ON a.prompt = b.prompt AND a.position = b.position AND a.layer + 1 = b.layer;
SELECT sum(array_inner_product(a.vec, b.vec)) FROM head_out a, head_out b WHERE a.prompt = 0 AND b.prompt = 1 AND a.layer = b.layer AND a.head = b.head;
SELECT count(*) FROM attention a JOIN attention b USING (prompt, layer, head, query_pos, key_pos) WHERE a.layer = 1 OR b.head = 0;
-- a heavy view and a light view
SELECT count(*) FROM resid r JOIN logit_lens l ON l.prompt = r.prompt WHERE l.layer = 0 AND r.position = 0;
SELECT p.word, sum(a.weight) FROM attention a JOIN prompts p USING (prompt) WHERE a.query_role = 4 AND a.key_pos = 0 GROUP BY p.word;
SELECT count(*) FROM resid r WHERE r.layer = (SELECT min(layer) FROM logit_lens WHERE target_rank = 0);
SELECT count(*) FROM resid WHERE layer IN (SELECT emergence_layer FROM emergence);
SELECT count(*) FROM attention WHERE (layer, head) IN (SELECT layer, head FROM dla WHERE component = 'head' AND dla > 0.5);
-- CTEs and UNION
WITH x AS (SELECT * FROM resid WHERE layer = 1) SELECT count(*) FROM x WHERE position > 2;
WITH x AS (SELECT * FROM resid WHERE layer = 1), y AS (SELECT * FROM resid WHERE layer = 2) SELECT (SELECT count(*) FROM x), (SELECT count(*) FROM y);
WITH RECURSIVE n(i) AS (SELECT -1 UNION ALL SELECT i + 1 FROM n WHERE i < 2) SELECT i, (SELECT count(*) FROM resid WHERE layer = n.i) FROM n;
SELECT layer FROM resid WHERE layer = 0 UNION SELECT layer FROM resid WHERE layer = 2;
SELECT count(*) FROM (SELECT prompt, layer FROM attn_out WHERE layer = 0 UNION ALL SELECT prompt, layer FROM mlp_out WHERE layer = 0);
SELECT count(*) FROM (SELECT * FROM resid WHERE layer = 0 EXCEPT SELECT * FROM resid WHERE position = 0);
SELECT count(*) FROM (SELECT prompt, position FROM resid WHERE layer = 0 INTERSECT SELECT prompt, position FROM resid WHERE role = 4);
-- correlated subqueries
SELECT p.prompt, (SELECT count(*) FROM resid r WHERE r.prompt = p.prompt AND r.layer = p.template_index) FROM prompts p;
SELECT prompt FROM prompts p WHERE EXISTS (SELECT 1 FROM attention a WHERE a.prompt = p.prompt AND a.weight > 0.9);
SELECT prompt, (SELECT max(weight) FROM attention a WHERE a.prompt = p.prompt AND a.query_pos = p.n_tokens - 1) FROM prompts p;
-- OR / NOT / expressions / IN / BETWEEN / NULL
SELECT count(*) FROM resid WHERE layer = 0 OR position = 1;
SELECT count(*) FROM resid WHERE NOT (layer = 0 OR position = 1);
SELECT count(*) FROM resid WHERE layer + 1 = 2;
SELECT count(*) FROM resid WHERE layer % 2 = 0 AND position * 2 < 5;
SELECT count(*) FROM resid WHERE abs(layer) = 1;
SELECT count(*) FROM resid WHERE layer IN (0, 2) AND prompt IN (0, 2);
SELECT count(*) FROM resid WHERE layer NOT IN (0, 2);
SELECT count(*) FROM resid WHERE layer IN (1, NULL);
SELECT count(*) FROM resid WHERE layer NOT IN (1, NULL);
SELECT count(*) FROM resid WHERE boundary BETWEEN 1 AND 2 AND prompt = 3;
SELECT count(*) FROM resid WHERE position NOT BETWEEN 1 AND 3;
SELECT count(*) FROM resid WHERE layer IS NULL;
SELECT count(*) FROM resid WHERE layer IS NOT NULL AND role IS DISTINCT FROM 4;
SELECT count(*) FROM resid WHERE NULL = layer;
SELECT count(*) FROM resid WHERE coalesce(NULL, layer) = 1;
SELECT count(*) FROM resid WHERE layer = 1.0;
SELECT count(*) FROM resid WHERE layer = 1.5;
SELECT count(*) FROM resid WHERE layer > 2147483647;
SELECT count(*) FROM resid WHERE layer = 9999999999;
SELECT count(*) FROM resid WHERE layer::VARCHAR = '1';
SELECT count(*) FROM resid WHERE CASE WHEN role = 4 THEN layer ELSE -5 END = 2;
SELECT count(*) FROM attention WHERE weight > 0.5 AND layer = 1;
SELECT count(*) FROM attention WHERE key_pos = 0 AND query_role = 4;
SELECT count(*) FROM attention WHERE key_role = 0 OR query_pos = key_pos;
SELECT count(*) FROM attention WHERE query_pos - key_pos = 1 AND head <> 1;
SELECT count(*) FROM head_out WHERE vec[1] > 0 AND layer >= 1;
SELECT count(*) FROM resid WHERE list_contains([0, 2], layer);
SELECT count(*) FROM dla WHERE head IS NULL AND layer >= 0;
SELECT count(*) FROM ablation WHERE head IS NULL OR unit_kind = 'head' AND layer = 1;
SELECT count(*) FROM ablation WHERE mode = 'zero' AND (head = 1 OR head IS NULL);
-- ordered results
SELECT prompt, boundary, position FROM resid WHERE layer = 1 AND role IN (0, 4) ORDER BY prompt, boundary, position;
SELECT prompt, layer, head, query_pos, key_pos FROM attention WHERE prompt = 2 AND layer = 1 AND head = 2 ORDER BY ALL;
SELECT prompt, layer, head FROM head_out WHERE head = 1 ORDER BY prompt DESC, layer LIMIT 5;
SELECT layer, count(*) FROM resid GROUP BY layer ORDER BY layer;
-- projections, LIMIT, sampling-free summaries
SELECT count(*) FROM (SELECT * FROM resid WHERE layer = 1 ORDER BY prompt, position LIMIT 7);
SELECT count(*), sum(position), min(layer), max(boundary) FROM resid;
SELECT count(DISTINCT (prompt, layer, head)) FROM head_out_all WHERE position = 4;
SELECT sum(a.vec[1] - b.vec[1]) FROM head_out_all a JOIN head_out b USING (prompt, layer, head) WHERE a.role = 4;
SELECT count(*) FROM mlp_out WHERE layer = 2 AND role = 2;
SELECT count(*) FROM attn_out WHERE position = 0 OR layer = 2;
SELECT count(*), sum(emergence_layer) FROM emergence;
SELECT * FROM heads ORDER BY head;
SELECT count(*) FROM tokens WHERE role = 4 AND in_word;
SELECT count(*) FROM manifest WHERE key LIKE '%o%';
