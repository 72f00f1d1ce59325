#!/bin/bash
# The bit-identity check of issue 16: build the three small warehouses with THIS tree and compare
# every dataset's hash (benchmarks/hash_warehouse.py) with the reference hashes made by the same
# runs on the code before the change.
#
#   bash benchmarks/bit_identical.sh REF OUT     # REF/<name>.sha256 from: hash_warehouse.py REF/<name>
#
# The runs (kept small; one thread, on the CPU, so BLAS reductions are the same as the reference's):
#   default-3w   the default study (ablation zero,sink,sink_norenorm) on 3 words
#   patching-2w  --patching --ablation zero on 2 words
#   gemma-2w     -m gemma3-270m --ablation zero on 2 words
# Exit status 1 if any warehouse differs.
set -euo pipefail
REF=$1; OUT=$2
ROOT=$(cd "$(dirname "$0")/.." && pwd)
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 HF_HUB_OFFLINE=1 PYTHONPATH=$ROOT
PY=$ROOT/.venv/bin/python; ECHOWH=$ROOT/.venv/bin/echowh
mkdir -p "$OUT"
printf 'cat\ndog\nhouse\n' > "$OUT/words3.txt"
printf 'cat\ndog\n' > "$OUT/words2.txt"
run() { local name=$1; shift; (cd "$ROOT" && $ECHOWH extract -q --device cpu --out "$OUT/$name" --resume "$@"); }
run default-3w --words "$OUT/words3.txt"
run patching-2w --patching --ablation zero --words "$OUT/words2.txt"
run gemma-2w -m gemma3-270m --ablation zero --words "$OUT/words2.txt"
status=0
for name in default-3w patching-2w gemma-2w; do
  $PY "$ROOT/benchmarks/hash_warehouse.py" "$OUT/$name" --against "$REF/$name.sha256" || status=1
done
exit $status
