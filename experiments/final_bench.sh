#!/usr/bin/env bash
# All side-by-side comparisons with the peers of ../shared/bench, alternating, in one session
# (~25 min on an idle 2-core machine): matmul peak; MAE train step (vit_s8_64, vit_t8_64) vs torch
# eager (with and without the huge-page malloc tunable) and torch.compile; Embedder vs the torch
# embedding peer; flow matching vs CellFlow. Results in BUILD_NOTES.md ("MAE speed", "Embedding",
# "Joint model"); the session-2 records are in notes/bench_s2/ and notes/bench_fm*.jsonl.
# Usage: bash experiments/final_bench.sh OUTDIR   (peer venvs: ../shared/bench/setup_peers.sh;
# override their location with PEERS=dir containing .venv-peer-torch and .venv-peer-cellflow;
# PARTS=mae,embed,fm picks the comparisons, REPS=N the MAE repetitions, default 2)
set -x
PARTS=${PARTS:-mae,embed,fm}
REPS=${REPS:-2}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
O=${1:-$ROOT/bench_out}; mkdir -p $O; O=$(cd $O && pwd)
B=${BENCH:-$ROOT/../shared/bench}
PEERS=${PEERS:-$B}
T=$PEERS/.venv-peer-torch/bin/python
C=$PEERS/.venv-peer-cellflow/bin/python
J=$ROOT/.venv/bin/python
cd $B
$T matmul_peak.py --backends numpy,torch --json $O/matmul.jsonl
$J matmul_peak.py --backends jax --json $O/matmul.jsonl
if [[ $PARTS == *mae* ]]; then
for r in $(seq $REPS); do
  for cfg in vit_s8_64 vit_t8_64; do
    $J $ROOT/experiments/bench_mae.py --config $cfg --batch 128 --warmup 3 --steps 10 --peak-json $O/matmul.jsonl --json $O/runs.jsonl --tag final$r
    # the same step on one unsplit CPU device (what the default split adds)
    $J $ROOT/experiments/bench_mae.py --config $cfg --batch 128 --warmup 3 --steps 10 --cpu-devices 1 --peak-json $O/matmul.jsonl --json $O/runs_1dev.jsonl --tag final$r-1dev
    $T peer_torch_mae.py --config $cfg --mode eager --peak-json $O/matmul.jsonl --json $O/runs.jsonl
    GLIBC_TUNABLES=glibc.malloc.hugetlb=1 $T peer_torch_mae.py --config $cfg --mode eager --peak-json $O/matmul.jsonl --json $O/runs_peer_thp.jsonl
  done
done
for cfg in vit_s8_64 vit_t8_64; do
  TORCHINDUCTOR_FORCE_DISABLE_CACHES=1 $T peer_torch_mae.py --config $cfg --mode compile --peak-json $O/matmul.jsonl --json $O/runs.jsonl
  $J $ROOT/experiments/bench_mae.py --config $cfg --batch 128 --warmup 3 --steps 10 --peak-json $O/matmul.jsonl --json $O/runs.jsonl --tag final3
done
fi
if [[ $PARTS == *embed* ]]; then
cd $ROOT && $J experiments/bench_embed.py --compare --reps 2 --json $O/embed.jsonl
cd $B
fi
if [[ $PARTS == *fm* ]]; then
for r in 1 2; do
  PYTHONPATH=$B $C peer_cellflow_fm.py --config mlp3x256 --parts train,vf_eval,sample --train-modes percell_vf_step --samples percell:euler20:10000:3 --json $O/fm_peer.jsonl --tag final$r 2>&1 | grep -v "Completed |"
  $J $ROOT/experiments/bench_fm.py --json $O/fm_ours.jsonl --tag final$r
done
fi
echo ALLDONE
