#!/usr/bin/env bash
# What only a CUDA GPU can show, in one run of about 15 minutes.
#   bash benchmarks/gpu_check.sh [precision|memory|mfu ...]     (default: all three; results under $OUT)
#   MEMORY_MODES="qlora" MFU_ARGS="--variants eager" bash benchmarks/gpu_check.sh memory mfu   (a subset)
# Logs go to $OUT/logs.txt (one file for all parts), results to $OUT/*.json[l].
# 1. precision/quantisation paths end to end on the tiny model: the demo under --precision auto (bf16),
#    fp16 with loss scaling, qlora (4-bit NF4 on CUDA) + paged 8-bit AdamW, lora + 8-bit AdamW; each run
#    trained, saved, reloaded by `eval`.
# 2. memory: the memory model's CUDA terms against torch's allocator, base-sized model at 768, bf16.
# 3. MFU of full fine-tuning, base-sized model, bf16, eager vs regional torch.compile, model step and
#    florence-kit's train_loop end to end.
# On a machine without the project's pure-Python dependencies, carry wheels in .whl/ (installed below).
set -u
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
PARTS=${*:-precision memory mfu}
source benchmarks/gpu_env.sh
python3 - <<'EOF'
import accelerate, bitsandbytes, datasets, peft, torch, transformers
print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(),
      "| transformers", transformers.__version__, "| peft", peft.__version__, "| accelerate", accelerate.__version__,
      "| bitsandbytes", bitsandbytes.__version__, "| datasets", datasets.__version__)
EOF
FK="python3 -m florence_kit.cli"

for part in $PARTS; do
  case $part in
  precision)
    start=$SECONDS
    timeout 120 $FK demo --quiet --output-dir /tmp/demo >> "$OUT/logs.txt" 2>&1; echo "demo rc=$? ($((SECONDS - start)) s)"
    cp /tmp/demo/demo.json "$OUT/demo.json" 2>/dev/null; tr -d '\n' < /tmp/demo/demo.json 2>/dev/null | cut -c1-400; echo
    python3 -c "from florence_kit.model.loading import load_for_generation as f; m, _ = f('/tmp/demo/finetuned'); \
print('eval/predict/serve generate on', next(m.parameters()).device)" 2>>"$OUT/logs.txt"  # expected: cuda:0
    IFS=';' read -ra RUNS <<< "${PRECISION_RUNS:-fp16 full adamw;bf16 qlora paged-adamw8bit;fp16 lora adamw8bit}"
    for spec in "${RUNS[@]}"; do
      set -- $spec
      run=/tmp/run-$1-$2
      start=$SECONDS
      timeout 60 $FK finetune docvqa --model /tmp/demo/model-init --dataset /tmp/demo/data --precision "$1" \
        --mode "$2" --optim "$3" --max-steps 150 --batch-size 16 --lr 1e-3 --output-dir "$run" --quiet \
        >> "$OUT/logs.txt" 2>&1
      echo "finetune $spec rc=$? ($((SECONDS - start)) s)"
      python3 - "$run" <<'EOF'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1] + "/metrics.jsonl")]
losses = [r["loss"] for r in rows if r.get("loss") is not None]
skipped = [r for r in rows if r.get("skipped")]
print(f"  loss first {losses[0]:.3f} last {losses[-1]:.3f}, logged {len(losses)}, skipped steps {len(skipped)}")
EOF
      timeout 45 $FK eval docvqa --model "$run" --dataset /tmp/demo/data --output-dir "$run-eval" --max-samples 64 \
        >> "$OUT/logs.txt" 2>&1
      echo "  eval rc=$? $(cat "$run-eval/metrics.json" 2>/dev/null | tr -d '\n ' | cut -c1-160)"
    done
    ;;
  memory)
    timeout 170 python3 -m benchmarks.memory --model base --device cuda --precision bf16 --batches 1 8 \
      --modes ${MEMORY_MODES:-full full+ckpt frozen-encoder lora qlora} --out "$OUT/memory_base_cuda.jsonl" \
      2>>"$OUT/logs.txt"
    echo "memory rc=$?"; cat "$OUT/memory_base_cuda.jsonl"
    ;;
  mfu)
    timeout 240 python3 -m benchmarks.train_mfu --batch 32 --steps 8 --end-to-end ${MFU_ARGS:-} --json "$OUT/mfu.json" \
      2>>"$OUT/logs.txt"
    echo "mfu rc=$?"
    ;;
  esac
done
