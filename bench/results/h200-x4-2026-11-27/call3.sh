#!/bin/bash
# call 3: the fleet on 4 GPUs (solo worker, then 4 workers of one hotkey), W1, 2 windows of 30 x 2.5-s blocks
R=$OUT/r; mkdir -p $R; cd /tmp/w
mkdir -p /tmp/redis && for f in $DEBS/*.deb; do dpkg -x $f /tmp/redis; done; export PATH=/tmp/redis/usr/bin:$PATH LD_LIBRARY_PATH=/tmp/redis/usr/lib/x86_64-linux-gnu:$LD_LIBRARY_PATH
redis-server --version > $R/redis.txt 2>&1
S=$(date +%s); timeout 575 python3 bench/fleet_scaling.py --model dummy:qwen2.5-3b --gpus 4 --windows 2 --block-time 2.5 --no-multi-gpu-benchmark --out $R > $R/fleet.log 2>&1; echo "rc=$? s=$(( $(date +%s)-S ))" >> $R/fleet.log
nvidia-smi --query-gpu=name,memory.total --format=csv > $R/gpu.txt
tar czf $OUT/r.tgz -C $OUT r
