#!/bin/bash
# call 2: #12 deadline runs at 512 and 256 slots, W2 + rotation, 24-GB rehearsal + W1
R=$OUT/r; mkdir -p $R/w1 $R/w2; cd /tmp/w
j(){ g=$1; t=$2; n=$3; shift 3; ( S=$(date +%s); CUDA_VISIBLE_DEVICES=$g timeout $t "$@" > $R/$n.log 2>&1; echo "rc=$? s=$(( $(date +%s)-S ))" >> $R/$n.log ) ; }
( j 0 560 deadline512 python3 bench/window_deadline.py --batch-size 512 --block-time 6 --windows 2 --out $R ) &
( j 1 560 deadline256 python3 bench/window_deadline.py --batch-size 256 --block-time 6 --windows 2 --out $R ) &
( j 2 330 w2 python3 bench/fast_vs_hf.py --model dummy:qwen3-4b --fast-batch-sizes 192,256 --fast-problems 96 --fast-warmup 8 --hf-problems 1 --hf-warmup 0 --verify 64 --hf-verify 16 --out $R/w2
  j 2 220 rotation python3 bench/rotation.py --out $R ) &
( j 3 250 mem24 python3 bench/memory_24gb.py --out $R
  j 3 300 w1 python3 bench/fast_vs_hf.py --model dummy:qwen2.5-3b --fast-batch-sizes 512 --fast-problems 128 --fast-warmup 8 --hf-problems 1 --hf-warmup 0 --verify 64 --hf-verify 16 --out $R/w1 ) &
wait
nvidia-smi --query-gpu=name,memory.total --format=csv > $R/gpu.txt
tar czf $OUT/r.tgz -C $OUT r
