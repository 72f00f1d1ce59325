-- name: circuit_faithfulness_curve
-- description: The faithfulness curve per method: for each pair kind, method, selection and
--   circuit size, the faithfulness averaged over the pairs (0 = the counterfactual, 1 = the clean
--   run), with the methods' mean CPR (area under the curve, higher is better) and CMD (area
--   between the curve and 1, lower is better). Empty unless extracted with --circuits.
-- param: metric VARCHAR {ld,kl} = 'ld' | metric the circuits were built and evaluated with
-- param: replacement VARCHAR {patch,mean,zero} = 'patch' | what edges outside the circuit carry
-- column: pair_kind VARCHAR | 'template' or 'word'
-- column: method VARCHAR | attribution method
-- column: selection VARCHAR | 'abs' or 'signed'
-- column: fraction DOUBLE | circuit size as a fraction of the edges
-- column: n_pairs BIGINT | pairs averaged
-- column: mean_n_edges DOUBLE | mean edges in the circuit
-- column: mean_faithfulness DOUBLE | mean faithfulness over the pairs
-- column: min_faithfulness DOUBLE | smallest over the pairs
-- column: max_faithfulness DOUBLE | largest over the pairs
-- column: mean_cpr DOUBLE | mean CPR of the method over the pairs (same on every size row)
-- column: mean_cmd DOUBLE | mean CMD of the method over the pairs
WITH f AS (
    SELECT pair_kind, method, selection, fraction, count(*) AS n_pairs, avg(n_edges) AS mean_n_edges,
           avg(faithfulness) AS mean_faithfulness, min(faithfulness) AS min_faithfulness,
           max(faithfulness) AS max_faithfulness
    FROM circuit_faithfulness
    WHERE metric = CAST($metric AS VARCHAR) AND replacement = CAST($replacement AS VARCHAR)
    GROUP BY pair_kind, method, selection, fraction
),
s AS (
    SELECT pair_kind, method, selection, avg(cpr) AS mean_cpr, avg(cmd) AS mean_cmd
    FROM circuit_summary
    WHERE metric = CAST($metric AS VARCHAR) AND replacement = CAST($replacement AS VARCHAR)
    GROUP BY pair_kind, method, selection
)
SELECT f.pair_kind, f.method, f.selection, f.fraction, f.n_pairs, f.mean_n_edges, f.mean_faithfulness,
       f.min_faithfulness, f.max_faithfulness, s.mean_cpr, s.mean_cmd
FROM f JOIN s USING (pair_kind, method, selection)
ORDER BY f.pair_kind, f.method, f.selection, f.fraction
