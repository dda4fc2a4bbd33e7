#!/bin/bash
# One GPU sitting of issue 24's measurements (compile and CUDA graphs; benchmarks/RESULTS.md, "CUDA graphs on
# SmolLM2"), as a background pipeline that outlives the device's 10-minute commands:
#
#   setsid nohup bash benchmarks/compile_sitting.sh > /dev/null 2>&1 < /dev/null &
#   sleep 500; cat runs/compile_sitting/stages.log; tar -czf $OUT/compile_sitting.tar.gz runs/compile_sitting
#
# Order: the GPU test that failed in the last sitting first, alone, stopping at the first failure with its whole
# traceback in its log at once (pytest writes failures at the end of a session: a sitting cut off mid-suite kept
# only dots); each adapter kernel's GPU time on SmolLM2's projections at 16 x 512 tokens beside the base GEMMs'
# (where the compiled step's time above the arithmetic floor goes); the other compile tests; the Llama-3.2-1B
# shape; the memory row without keep_u; `rasa-lora train`'s tokens/s eager and under CUDA graphs (needs the model
# at $BASE); every other GPU test; the Llama-3.1-8B shape in 5 processes (slowest: two 32-layer compilations a
# process). Each stage writes its JSON as it ends.
# Environment: BASE (default /tmp/smollm2.gguf; the training stages wait up to 30 minutes for it to appear: stage it
# whole, e.g. `cat q0 q1 > $BASE.part && mv $BASE.part $BASE`), DATA (.data), DRY_RUN=1 prints the commands,
# SKIP=NAME,... leaves stages out (measured in the fourth round: kernels-smollm2,host-llama-1b,host-keep-u-off,
# train-eager).
# No stage is wrapped in `timeout`: a command killed on the device would leave a `timeout` child running.
set -u
BASE=${BASE:-/tmp/smollm2.gguf}
DATA=${DATA:-.data}
P=runs/compile_sitting
H="python3 benchmarks/host_time.py"
TT="python3 benchmarks/train_throughput.py --variants frozen,rasa,lora --steps 10 --warmup 3"
RECIPE="--base-model $BASE --dataset $DATA/gsm8k/train.jsonl --micro-batch-size 32 --global-batch-size 32 \
--cutoff-len 512 --dropout 0.05"
PYTEST="python3 -m pytest -p no:cacheprovider -m gpu -x -rA --tb=long"
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1
. "$(dirname "$0")/sitting_steps.sh"  # step NAME COMMAND...
step test-checkpointed-graphs $PYTEST -vv tests/ops/test_graph_seed.py::test_reduce_overhead_training_steps_equal_eager
step kernels-smollm2 python3 benchmarks/kernel_timing.py --model smollm2 --tokens 8192 --refs --out $P/k_smollm2.json
step test-compile $PYTEST tests/ops/test_compile.py tests/train/test_compile_option.py
step host-llama-1b $H --shapes llama-1b --modes eager,compile:reduce-overhead --methods frozen,lora,rasa --steps 7 \
  --out $P/ht_llama1b.json
step host-keep-u-off env RASA_LORA_KEEP_U=0 $H --shapes smollm2 --modes eager --methods frozen,rasa --steps 7 \
  --out $P/ht_keepu0.json
if [ "${DRY_RUN:-0}" != 1 ]; then  # the model may be staged by a later device command: wait up to 30 minutes
  for _ in $(seq 180); do [ -e "$BASE" ] && break; sleep 10; done
fi
step train-eager $TT --out $P/tt_eager.json -- $RECIPE
step train-graphs $TT --out $P/tt_graphs.json -- $RECIPE --compile true --compile-mode reduce-overhead \
  --pad-to-multiple-of 64
step tests-gpu python3 -m pytest -p no:cacheprovider -m gpu -rfE --tb=short tests --ignore=tests/distributed
step host-llama-8b $H --shapes llama-8b --methods frozen,rasa --modes compile:reduce-overhead --steps 7 --processes 5 \
  --out $P/ht_8b.json
