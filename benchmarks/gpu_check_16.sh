#!/usr/bin/env bash
# GPU check for issue 16: one LoRA / DoRA / QLoRA training step of jlora's Llama next to Hugging
# Face PEFT at the issue16 preset (hidden 2048, 16 layers, intermediate 5632, vocab 32000, 32 heads,
# 4 KV heads: a TinyLlama-like 953M model; batch 8 x 1024 tokens), bf16, on one NVIDIA GPU.
#
#   OUT=/some/dir bash benchmarks/gpu_check_16.sh          # ~8 minutes on an H100 / H200
#   SMOKE=1 OUT=/tmp/g16 bash benchmarks/gpu_check_16.sh    # the same plumbing on CPU, tiny shapes
#
# Writes under "$OUT" (the GPU runner provides it):
#   llama_step_gpu.json          jlora-lora / -dora / -qlora (attention cudnn, loss chunk $CHUNK) and
#                                peft-lora / -dora / -qlora eager, peft-lora / -dora under torch.compile
#   llama_step_gpu_remat.json    jlora-lora / -dora / -qlora with --remat true (the memory targets)
#   llama_step_gpu_xla.json      jlora-lora with --attention xla      (what cuDNN attention buys)
#   llama_step_gpu_nochunk.json  jlora-lora with --loss-chunk 0       (what the chunked loss buys)
#   logs/                        every child process's full output
#   llama_step_gpu_fused.json    jlora-lora with --fuse-projections
#   summary.txt                  the tables the runs printed
# Every child has a timeout and the whole script a budget ($BUDGET s): a child that cannot finish is
# recorded as timed out / skipped and the JSON written so far is kept (it is rewritten after every
# child). The random weights are made once (about 30 s) and cached in $WORKDIR for the later runs.
# Environment: PY (python with jax[cuda], torch+CUDA, transformers, peft, bitsandbytes; default
# python3), BUDGET (seconds, default 470), CHUNK (jlora loss chunk in sequence positions, default 256),
# STEPS (timed steps, default 10), WARMUP (default 2), WORKDIR (default /tmp/jlora_llama_step).
set -u -o pipefail

cd "$(dirname "$0")/.."
: "${OUT:?set OUT to the directory for the results}"
mkdir -p "$OUT/logs"
PY=${PY:-python3}
BUDGET=${BUDGET:-470}
CHUNK=${CHUNK:-256}
STEPS=${STEPS:-10}
WARMUP=${WARMUP:-2}
WORKDIR=${WORKDIR:-/tmp/jlora_llama_step}
ATTN=cudnn
SHAPE=(--preset issue16)
TIMEOUT=180          # per child (jlora, PEFT eager)
TIMEOUT_COMPILE=240  # per peft-*-compile child
RESERVE=190          # seconds kept back from the main run for the remat and lever runs
if [ "${SMOKE:-0}" = 1 ]; then
  # CPU, tiny shapes, one pinned thread: checks the plumbing (cuDNN attention does not exist on CPU)
  ATTN=explicit
  SHAPE=(--smoke --threads 1)
  CHUNK=8
  STEPS=2
  WARMUP=1
  TIMEOUT=300
  TIMEOUT_COMPILE=300
  BUDGET=${SMOKE_BUDGET:-1500}
  RESERVE=300
fi
START=$SECONDS
left() { echo $(( BUDGET - (SECONDS - START) )); }

run() {   # run NAME ARGS...: one llama_step.py invocation, its output kept in summary.txt
  local name=$1; shift
  echo "=== $name ($(left) s of the budget left) ===" | tee -a "$OUT/summary.txt"
  "$PY" benchmarks/llama_step.py "${SHAPE[@]}" --steps "$STEPS" --warmup "$WARMUP" \
      --workdir "$WORKDIR" --log-dir "$OUT/logs" "$@" 2>&1 | tee -a "$OUT/summary.txt"
  local rc=${PIPESTATUS[0]}
  echo "=== $name: exit $rc ===" | tee -a "$OUT/summary.txt"
  return 0
}

echo "gpu_check_16: $(date -u +%FT%TZ) on $(hostname)" | tee "$OUT/summary.txt"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader \
  | tee -a "$OUT/summary.txt"

# 1. the comparison. Order = priority under the budget: the eager pairs first, torch.compile last
#    (its compile is the slowest part); each child gets its own timeout and the main run leaves
#    $RESERVE s for the lever runs below.
run main --attention "$ATTN" --loss-chunk "$CHUNK" \
    --variants jlora-lora,peft-lora,jlora-dora,peft-dora,jlora-qlora,peft-qlora,peft-lora-compile,peft-dora-compile \
    --timeout "$TIMEOUT" --compile-timeout "$TIMEOUT_COMPILE" --deadline $(( $(left) - RESERVE )) \
    --out "$OUT/llama_step_gpu.json"

# 2. the levers, one at a time, jlora-lora only. Should jlora-lora have failed with cuDNN attention
#    (a jax / cuDNN without fused attention for these shapes), the jlora side is run again with XLA's
#    attention instead, all three variants, so that the comparison still has jlora numbers.
status=$("$PY" -c 'import json, sys; print(json.load(open(sys.argv[1]))["results"].get("jlora-lora", {}).get("status"))' \
         "$OUT/llama_step_gpu.json" 2>/dev/null || echo missing)
if [ "$status" != ok ] && [ "$ATTN" = cudnn ]; then
  echo "jlora-lora did not run with cuDNN attention (status: $status): the jlora variants again with --attention xla" \
    | tee -a "$OUT/summary.txt"
  XLA_VARIANTS=jlora-lora,jlora-dora,jlora-qlora
  NOCHUNK_ATTN=xla
else
  XLA_VARIANTS=jlora-lora
  NOCHUNK_ATTN=$ATTN
fi
# the memory targets (6 / 8 / 3.5 GiB) need remat: the deviceless H200 compile (gpu_aot.py) gives
# 2.9 / 3.5 / 1.9 GiB with it and 15.2 / 24.2 / 14.3 without; this measures what it costs in tokens/s
run remat --variants jlora-lora,jlora-dora,jlora-qlora --attention "$NOCHUNK_ATTN" --loss-chunk "$CHUNK" --remat true \
    --timeout "$TIMEOUT" --deadline $(( $(left) - RESERVE * 3 / 8 )) --out "$OUT/llama_step_gpu_remat.json"
run attention-xla --variants "$XLA_VARIANTS" --attention xla --loss-chunk "$CHUNK" \
    --timeout "$TIMEOUT" --deadline $(( $(left) - RESERVE / 6 )) --out "$OUT/llama_step_gpu_xla.json"
run no-loss-chunk --variants jlora-lora --attention "$NOCHUNK_ATTN" --loss-chunk 0 \
    --timeout "$TIMEOUT" --deadline $(( $(left) - RESERVE / 12 )) --out "$OUT/llama_step_gpu_nochunk.json"
run fused --variants jlora-lora --attention "$NOCHUNK_ATTN" --loss-chunk "$CHUNK" --fuse-projections \
    --timeout "$TIMEOUT" --deadline "$(left)" --out "$OUT/llama_step_gpu_fused.json"

echo "gpu_check_16: done in $(( SECONDS - START )) s" | tee -a "$OUT/summary.txt"
ls -l "$OUT" | tee -a "$OUT/summary.txt"
