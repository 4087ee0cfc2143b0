#!/usr/bin/env bash
# All side-by-side comparisons with the peers of ../shared/bench, alternating, in one session
# (~25 min on an idle 2-core machine): matmul peak; MAE train step (vit_s8_64, vit_t8_64) vs torch
# eager (with and without the huge-page malloc tunable) and torch.compile; Embedder vs the torch
# embedding peer; flow matching vs CellFlow. Results in BUILD_NOTES.md ("MAE speed", "Embedding",
# "Joint model"); the session-2 records are in notes/bench_s2/ and notes/bench_fm*.jsonl.
#
# Usage: bash experiments/final_bench.sh [OUTDIR=bench_out]
#   BENCH=dir    the peers' bench folder (default <repo>/../shared/bench)
#   PEERS=dir    folder holding .venv-peer-torch and .venv-peer-cellflow (default $BENCH; made by
#                `bash $BENCH/setup_peers.sh`)
#   PYTHON=py    cosmic_jax's python (default <repo>/.venv/bin/python); the checkout is put first on
#                PYTHONPATH, so the code measured is this repository's
#   PARTS=mae,embed,fm picks the comparisons, REPS=N the MAE repetitions (default 2)
#   TINY=1       smoke: vit_t8_64 only, 1 warm-up + 2 timed steps, one repetition, tiny flow sizes
set -eu
PARTS=${PARTS:-mae,embed,fm}
REPS=${REPS:-2}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
O=${1:-$ROOT/bench_out}; mkdir -p "$O"; O=$(cd "$O" && pwd)
B=$(cd "${BENCH:-$ROOT/../shared/bench}" 2>/dev/null && pwd) || {
  echo "final_bench.sh: no bench folder at ${BENCH:-$ROOT/../shared/bench}; set BENCH=dir" >&2; exit 2; }
PEERS=${PEERS:-$B}
T=$PEERS/.venv-peer-torch/bin/python
C=$PEERS/.venv-peer-cellflow/bin/python
J=${PYTHON:-$ROOT/.venv/bin/python}
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
missing=""
[[ -x $J ]] || { echo "final_bench.sh: $J not found; make the project venv or set PYTHON=..." >&2; exit 2; }
[[ -x $T ]] || missing="$missing $T"
[[ $PARTS != *fm* || -x $C ]] || missing="$missing $C"
if [[ -n $missing ]]; then
  echo "final_bench.sh: peer venv(s) missing:$missing" >&2
  echo "  create them with: bash $B/setup_peers.sh   (or point PEERS=dir at existing ones)" >&2
  exit 2
fi
STEPS="--warmup 3 --steps 10"; CFGS="vit_s8_64 vit_t8_64"; FM=""; EMB="--reps 2"
if [[ -n ${TINY:-} ]]; then
  STEPS="--warmup 1 --steps 2"; CFGS="vit_t8_64"; REPS=1; FM="--tiny"; EMB="--reps 1 --warmup 1 --steps 2"
fi
set -x
cd "$B"
$T matmul_peak.py --backends numpy,torch --json "$O/matmul.jsonl"
$J matmul_peak.py --backends jax --json "$O/matmul.jsonl"
MAE="$J $ROOT/experiments/bench_mae.py --bench-dir $B --peak-json $O/matmul.jsonl $STEPS"
if [[ $PARTS == *mae* ]]; then
for r in $(seq "$REPS"); do
  for cfg in $CFGS; do
    $MAE --config $cfg --json "$O/runs.jsonl" --tag final$r
    # the same step on one unsplit CPU device (what the default split adds)
    $MAE --config $cfg --config.mesh.cpu_devices=1 --json "$O/runs_1dev.jsonl" --tag final$r-1dev
    $T peer_torch_mae.py --config $cfg --mode eager $STEPS --peak-json "$O/matmul.jsonl" --json "$O/runs.jsonl"
    GLIBC_TUNABLES=glibc.malloc.hugetlb=1 $T peer_torch_mae.py --config $cfg --mode eager $STEPS --peak-json "$O/matmul.jsonl" --json "$O/runs_peer_thp.jsonl"
  done
done
for cfg in $CFGS; do
  TORCHINDUCTOR_FORCE_DISABLE_CACHES=1 $T peer_torch_mae.py --config $cfg --mode compile $STEPS --peak-json "$O/matmul.jsonl" --json "$O/runs.jsonl"
  $MAE --config $cfg --json "$O/runs.jsonl" --tag final3
done
fi
if [[ $PARTS == *embed* ]]; then
  $J "$ROOT/experiments/bench_embed.py" --compare $EMB --bench-dir "$B" --peer-python "$T" --json "$O/embed.jsonl"
fi
if [[ $PARTS == *fm* ]]; then
for r in $(seq $([[ -n ${TINY:-} ]] && echo 1 || echo 2)); do
  PYTHONPATH=$B $C peer_cellflow_fm.py --config mlp3x256 --parts train,vf_eval,sample --train-modes percell_vf_step --samples percell:euler20:10000:3 --json "$O/fm_peer.jsonl" --tag final$r 2>&1 | grep -v "Completed |"
  $J "$ROOT/experiments/bench_fm.py" $FM --json "$O/fm_ours.jsonl" --tag final$r
done
fi
echo ALLDONE
