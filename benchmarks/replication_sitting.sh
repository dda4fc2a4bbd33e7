#!/bin/bash
# One GPU sitting of the replication study (docs/replication.md), as a background pipeline that outlives the
# device's 10-minute commands: start it with `setsid`, then watch and `pack` in later commands:
#
#   setsid nohup bash benchmarks/replication_sitting.sh > /dev/null 2>&1 < /dev/null &
#   sleep 500; cat runs/replication/pipe/stages.log; python3 benchmarks/replication.py pack --out $OUT/replication.tar.gz
#
# Stages, each resumable (a rerun skips what is done): the paper-setting runs and the full fine-tune; their
# evaluation (multiple choice first, then GSM8K, so forgetting comes back even if GSM8K is cut); the analysis of the
# full fine-tune's deltas; then the matched pair (RaSA alpha 16, LoRA alpha 9.5) trained and evaluated.
# Environment: BASE (default /tmp/smollm2.gguf), DATA (.data), TJOBS (trainings side by side: 4 on a card of more
# than 100 GB, else 3; a training process holds up to 25-29 GiB), JOBS (evaluation processes, 4), DRY_RUN=1 prints
# the commands instead of running them. No stage is wrapped in `timeout`: a command killed on the device would leave
# a `timeout` child running in its own process group.
set -u
BASE=${BASE:-/tmp/smollm2.gguf}
DATA=${DATA:-.data}
P=runs/replication/pipe
R="python3 benchmarks/replication.py"
A8=lora-r8-s0,lora-r8-s1,lora-r8-s2,rasa-r8-s0,rasa-r8-s1,rasa-r8-s2
M=lora-r8-a9.5-s0,lora-r8-a9.5-s1,lora-r8-a9.5-s2,rasa-r8-a16-s0,rasa-r8-a16-s1,rasa-r8-a16-s2
if [ -z "${TJOBS:-}" ]; then
  MEM=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits 2>/dev/null | head -1)
  TJOBS=$([ "${MEM:-0}" -gt 100000 ] && echo 4 || echo 3)
fi
T="--base-model $BASE --data-dir $DATA"
G="generate $T --jobs ${JOBS:-4} --batch-size 1319 --time-limit 3000"
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
. "$(dirname "$0")/sitting_steps.sh"  # step NAME COMMAND...
step train-paper $R train --runs $A8,fft-s0 $T --jobs $TJOBS --time-limit 3000 -- --dataset-fraction 0.5
step analyze $R analyze $T
step eval-paper-mc $R $G --runs base,$A8 --tasks arc_challenge,winogrande,hellaswag
step eval-paper-gsm8k $R $G --runs base,$A8,fft-s0 --tasks gsm8k
step train-matched $R train --runs $M $T --jobs $TJOBS --time-limit 3000 -- --dataset-fraction 0.5
step eval-matched $R $G --runs $M
