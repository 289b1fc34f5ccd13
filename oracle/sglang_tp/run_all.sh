#!/usr/bin/env bash
# Regenerate every golden TP rank map under tests/golden/tp/sglang-<version>/.
#   oracle/sglang_tp/run_all.sh [PYTHON ...]
# Each PYTHON is the interpreter of a venv with one SGLang release installed (see README.md); default:
# /work/venvs/tp-sglang-0.5.23/bin/python. TP sizes: $TP_SIZES (default "1 2 4 8"; TP 1 is the reference compare_nhcheck.py composes with nhcheck's windows).
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
PYS=("$@")
[ ${#PYS[@]} -eq 0 ] && PYS=(/work/venvs/tp-sglang-0.5.23/bin/python)
CASES=()
for model in hybrid latentpad; do
  for qb in bf16:triton bf16:flashinfer_trtllm fp8:triton fp8:flashinfer_trtllm \
            nvfp4:flashinfer_cutlass nvfp4:flashinfer_trtllm mixed:flashinfer_cutlass mixed:flashinfer_trtllm; do
    CASES+=(--case "$model:$qb")
  done
done
CASES+=(--case g1:bf16:triton --case g1:bf16:flashinfer_trtllm --case bias:bf16:triton --case g1bias:bf16:triton)
# what "auto" resolves to on the emulated sm100, and the routed trtllm variant
CASES+=(--case latentpad:nvfp4:auto --case latentpad:bf16:auto --case latentpad:nvfp4:flashinfer_trtllm_routed)
for PY in "${PYS[@]}"; do
  VER="$("$PY" -c 'import importlib.metadata as m; print(m.version("sglang"))')"
  OUT="$ROOT/tests/golden/tp/sglang-$VER"
  for TP in ${TP_SIZES:-1 2 4 8}; do
    "$PY" "$HERE/tp_oracle.py" --tp "$TP" --out "$OUT" --platform sm100 "${CASES[@]}" 2>&1 \
      | grep -v -i -E 'warn|^\s*$' || true
  done
  "$PY" "$HERE/summarize.py" "$OUT" > "$OUT/SUMMARY.md" || true
  # nhcheck's current TP rules against these maps (the repository's nhcheck; needs the -tp1 files)
  "$PY" "$HERE/compare_nhcheck.py" "$OUT" --label "nhcheck at $(git -C "$ROOT" rev-parse --short HEAD)" \
    > "$HERE/nhcheck-compare-sglang-$VER.md" || true
done
