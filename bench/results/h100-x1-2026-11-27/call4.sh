#!/bin/bash
# call 4 (one H100): W2 fast vs hf in one run, then the 24-GB rehearsal
R=$OUT/r; mkdir -p $R/w2; cd /tmp/w
S=$(date +%s); timeout 330 python3 bench/fast_vs_hf.py --model dummy:qwen3-4b --fast-batch-sizes 192 --fast-problems 64 --fast-warmup 8 --hf-problems 1 --hf-warmup 0 --verify 64 --hf-verify 16 --out $R/w2 > $R/w2.log 2>&1; echo "rc=$? s=$(( $(date +%s)-S ))" >> $R/w2.log
S=$(date +%s); timeout 230 python3 bench/memory_24gb.py --batch-sizes 64,128 --calibrate-problems 8 --benchmark-problems 24 --out $R > $R/mem24.log 2>&1; echo "rc=$? s=$(( $(date +%s)-S ))" >> $R/mem24.log
nvidia-smi --query-gpu=name,memory.total --format=csv > $R/gpu.txt
tar czf $OUT/r.tgz -C $OUT r
