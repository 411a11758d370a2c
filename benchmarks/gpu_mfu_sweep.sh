#!/usr/bin/env bash
# Where full fine-tuning's GPU time goes and what raises MFU, in four parts of under ten minutes each.
#   bash benchmarks/gpu_mfu_sweep.sh [1|2|3|4]  (1 and 2 give docs/benchmarks.md's MFU table; results under $OUT)
# Eager variants first (seconds each, profiled: top kernels + the DaViT tower's share of a step), then
# regional torch.compile at batch 32 and 64, then florence-kit's own train_loop compiled, end to end.
# Each part has its own timeout so that a slow compile leaves the earlier rows intact.
set -u
OUT=${OUT:-/tmp/gpu_mfu}
mkdir -p "$OUT"
source benchmarks/gpu_env.sh
python3 -c 'import torch, transformers; print("torch", torch.__version__, "| transformers", transformers.__version__)'
MFU=${MFU:-python3 -m benchmarks.train_mfu --steps 6 --warmup 2}
part() {  # name timeout args...
  local name=$1 limit=$2; shift 2
  local start=$SECONDS
  timeout "$limit" $MFU "$@" --json "$OUT/mfu_$name.json" > "$OUT/log_$name.txt" 2>&1
  echo "== $name rc=$? ($((SECONDS - start)) s)"
  grep -E '^\{"what"' "$OUT/log_$name.txt" | python3 -c '
import json, sys
for line in sys.stdin:
    r = json.loads(line)
    what, batch, step, rate, tf = r["what"], r["batch"], r["step_s"], r["samples_per_s"], r["achieved_tflops"]
    t, w, peak = r.get("tower_share"), r.get("warmup_s", 0), r["peak_mem_gb"]
    tower = "" if t is None else f", tower {t:.0%} of the step"
    print(f"  {what} b{batch}: {step:.3f} s/step, {rate:.0f} samples/s, {tf:.0f} TFLOP/s = {tf / 989.4:.1%} of 989"
          f"{tower}, warm-up {w:.0f} s, peak {peak:.0f} GB")'
}
if [ "${1:-1}" = 1 ]; then  # part 1: flags, compile, batch 64, end to end
  part eager 100 --batches 32 --profile --variants eager,eager+cudnn,eager+mathred,eager+fused,eager+cudnn+mathred+fused+tf32
  part compiled32 200 --batches 32 --profile --variants compiled,compiled+cudnn+mathred+fused
  part b64 110 --batches 64 --variants eager+cudnn+mathred+fused,compiled+cudnn+mathred+fused
  part e2e 130 --variants "" --end-to-end --e2e-variants compiled --batch 32
elif [ "$1" = 2 ]; then  # part 2: what part 1's profile points at (eager patch embeddings, attention kernels)
  part sdpa 160 --batches 32 --profile \
    --variants compiled+cudnn+mathred,compiled+cudnn+mathred+embeds,compiled+cudnn+mathred+nocudnnsdp
  part visioneager 140 --batches 32 --profile --variants compiled+cudnn+mathred+embeds+visioneager
elif [ "$1" = 4 ]; then  # part 4 (~8 min): inductor's autotuned templates for DaViT, block by block and whole tower
  part autotune 280 --batches 32 --variants compiled+cudnn+mathred+autotune
  part towerautotune 280 --batches 32 --variants compiled+cudnn+mathred+tower+autotune
else  # part 3 (~9 min): one variant per process (a compile takes ~90 s, so each gets its own timeout)
  part embeds 120 --batches 32 --profile --variants compiled+cudnn+mathred+embeds
  part tower 170 --batches 32 --profile --variants compiled+cudnn+mathred+tower
  part nocudnnsdp 120 --batches 32 --variants compiled+cudnn+mathred+nocudnnsdp
  # the CUDA qlora memory rows with the 4-bit layers computing in the run's precision (bf16)
  timeout 100 python3 -m benchmarks.memory --model base --device cuda --precision bf16 --batches 1 8 --modes qlora \
    --out "$OUT/memory_qlora_cuda.jsonl" > "$OUT/log_memory.txt" 2>&1
  echo "== memory qlora rc=$?"; cat "$OUT/memory_qlora_cuda.jsonl"
fi
