#!/usr/bin/env bash
# The GPU checks of the kernels in one run, for a lent GPU machine that has torch, CuPy and nvcc but no
# network: stage the package as it installs (llmprune/, cli/ → llmprune.cli, kernels/ → llmprune._cuda), add
# wheels from .whl/ if present, then the metadata probe, the GPU tests, and the kernel and decode benchmark.
# Logs and JSON go to $OUT (default /tmp/llmprune-gpu).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/llmprune-gpu}
SITE=/tmp/llmprune-site
mkdir -p "$OUT" && rm -rf "$SITE" && mkdir -p "$SITE/llmprune"
cp -r llmprune/. "$SITE/llmprune/" && cp -r cli "$SITE/llmprune/cli" && cp -r recipes "$SITE/llmprune/recipes" \
  && cp -r kernels "$SITE/llmprune/_cuda"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" .whl/*.whl || exit 1
fi
export PYTHONPATH="$SITE" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu --format=csv
python3 -c "import torch, cupy, transformers; print('torch', torch.__version__, 'cupy', cupy.__version__, 'transformers', transformers.__version__)"
python3 eval/probe_sparse24_meta.py 2>&1 | tee "$OUT/probe.log"
if grep -q "khalf.*WRONG" "$OUT/probe.log" && ! grep -q "row .*WRONG" "$OUT/probe.log"; then
  echo "PROBE: the 'row' metadata layout is the one the hardware reads; using it for this run"
  sed -i 's/meta_layout: str = "khalf"/meta_layout: str = "row"/' "$SITE/llmprune/kernels.py"
fi
timeout "${TEST_TIMEOUT:-150}" python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_kernels.py tests/test_deploy.py 2>&1 \
  | tee "$OUT/pytest.log" | tail -25
timeout 120 python3 - "$OUT/tiny24" <<'PY' && (cd /tmp && timeout 120 python3 -m llmprune bench "$OUT/tiny24" --repeats 10 --decode-tokens 16 --tokens 1,64 2>&1 | tail -20)
import sys
sys.path.insert(0, "tests")
import torch
from conftest import byte_tokenizer, tiny_model
from llmprune import calibrate
from llmprune.masks import Pattern
model = tiny_model("llama")
calibrate.prune_model(model, None, method="magnitude", sparsity=0.5, pattern=Pattern(2, 4))
model.save_pretrained(sys.argv[1])
byte_tokenizer().save_pretrained(sys.argv[1])
PY
rm -rf "$OUT/tiny24"
timeout "${BENCH_TIMEOUT:-200}" python3 eval/bench_kernels.py --out "$OUT/kernels.json" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.log"
