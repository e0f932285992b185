#!/usr/bin/env bash
#SBATCH --job-name=footprints
#SBATCH --gres=gpu:1
#SBATCH --cpus-per-task=8
#SBATCH --time=04:00:00
#SBATCH --output=logs/%x-%j.out
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --signal=B:USR1@180
#
# footprints: one script for everything.
#   bash run.sh                      set up .venv, then run the whole pipeline on the synthetic demo
#   bash run.sh test                 the test suite (ruff + pytest)
#   bash run.sh CMD ARGS...          `footprints CMD ARGS...` in the environment (tile, predict, bench, ...)
#   sbatch run.sh train-segmenter --config configs/xview2.yaml --load_saved_model
#                                    (`mkdir -p logs` first: SLURM opens the log before this script runs;
#                                    the job runs in the submit directory with this checkout's environment)
#
# Environment knobs:
#   TORCH_SPEC          what pip installs for torch (default torch==2.13.0; on a GPU node e.g.
#                       "torch==2.13.0 --index-url <your CUDA wheel index>")
#   FOOTPRINTS_PYTHON   use this interpreter (an environment you already have) instead of .venv
#   FOOTPRINTS_VENV     where to create the environment (default <repo>/.venv)
#
# Under SLURM the trainer runs in the background so that this shell can catch the pre-timeout
# signal (--signal=B:USR1@180) and forward it; the trainer checkpoints and exits with code 99, and
# this script requeues the job, which then resumes by itself (--load_saved_model is added). Several
# tasks (--ntasks=N, one per GPU) are started with srun, which forwards the signal to every rank.
if [ -n "${SLURM_JOB_ID:-}" ]; then
  # first thing: with a short --time the pre-timeout warning can come at once, before the trainer has a
  # handler for it (an untrapped USR1 kills this shell, and python until it installs its handler): record it
  # in a file that the trainer checks at every step as well as its signal flag (footprints/training/signals.py)
  FOOTPRINTS_STOP_FILE="${TMPDIR:-/tmp}/footprints-stop-${SLURM_JOB_ID}-${SLURM_RESTART_COUNT:-0}-$$"
  trap ': > "$FOOTPRINTS_STOP_FILE"' USR1
  export FOOTPRINTS_STOP_FILE
fi
set -uo pipefail

if [ -n "${SLURM_JOB_ID:-}" ] && [ -n "${SLURM_SUBMIT_DIR:-}" ]; then
  # a batch job runs from the submit directory (relative --config paths and logs/ are the user's), and
  # $0 is slurmd's spool copy of this file: find the checkout (for .venv) from the command that was
  # submitted, which scontrol records as typed (maybe relative to the submit directory)
  WORKDIR=$SLURM_SUBMIT_DIR
  REPO=$SLURM_SUBMIT_DIR
  script=$(scontrol show job "$SLURM_JOB_ID" 2>/dev/null | sed -n 's/^ *Command=\([^ ]*\).*/\1/p' | head -1)
  case "$script" in /*) ;; ?*) script=$SLURM_SUBMIT_DIR/$script ;; esac
  if [ -n "$script" ] && [ -f "$(dirname "$script")/pyproject.toml" ]; then
    REPO=$(cd "$(dirname "$script")" && pwd)
  fi
else
  REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
  WORKDIR=$REPO
fi
cd "$WORKDIR" || exit 1
mkdir -p logs

log() { echo "[run.sh $(date +%H:%M:%S)${SLURM_JOB_ID:+ job=$SLURM_JOB_ID}] $*" >&2; }

# ---- environment ------------------------------------------------------------------------------
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
VENV=${FOOTPRINTS_VENV:-$REPO/.venv}

ensure_env() {
  if [ -n "${FOOTPRINTS_PYTHON:-}" ]; then
    PY=$FOOTPRINTS_PYTHON
    "$PY" -c "import footprints" 2>/dev/null || "$PY" -m pip install -q -e "$REPO[test]" || return 1
    return 0
  fi
  PY=$VENV/bin/python
  local stamp_file=$VENV/.footprints-stamp stamp
  # reinstall only when what we install changed: the package metadata, the torch spec, the interpreter
  stamp=$( { cat "$REPO/pyproject.toml"; echo "$TORCH_SPEC"; python3 --version 2>&1; } | sha256sum | cut -c1-16)
  if [ -x "$PY" ] && [ "$(cat "$stamp_file" 2>/dev/null)" = "$stamp" ]; then
    return 0
  fi
  log "setting up $VENV (torch: $TORCH_SPEC)"
  [ -x "$PY" ] || python3 -m venv "$VENV" || { log "python3 -m venv failed"; return 1; }
  # shellcheck disable=SC2086 # TORCH_SPEC may carry pip options such as --index-url
  "$PY" -m pip install -q --disable-pip-version-check $TORCH_SPEC || { log "installing $TORCH_SPEC failed"; return 1; }
  "$PY" -m pip install -q --disable-pip-version-check -e "$REPO[test]" || { log "installing footprints failed"; return 1; }
  echo "$stamp" > "$stamp_file"
  log "environment ready"
}

# ---- SLURM ------------------------------------------------------------------------------------
slurm_banner() {
  log "job $SLURM_JOB_ID (${SLURM_JOB_NAME:-}) on $(hostname -s), restart ${SLURM_RESTART_COUNT:-0}," \
      "tasks ${SLURM_NTASKS:-1}, CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-none}"
  if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi -L 2>/dev/null | while read -r line; do log "gpu: $line"; done
  fi
  log "args: $*"
}

requeue_allowed() {
  scontrol show job "$SLURM_JOB_ID" 2>/dev/null | grep -q 'Requeue=1'
}

run_under_slurm() {
  local args=("$@")
  # a requeued run resumes by itself
  if [ "${SLURM_RESTART_COUNT:-0}" -gt 0 ]; then
    case " ${args[*]} " in
      *" train-segmenter "*|*" all "*)
        case " ${args[*]} " in *" --load_saved_model "*) ;; *) args+=(--load_saved_model) ;; esac ;;
    esac
  fi
  slurm_banner "${args[@]}"
  local launcher=()
  if [ "${SLURM_NTASKS:-1}" -gt 1 ]; then
    # one process per GPU/task; srun forwards USR1 to the tasks. When one task ends, the others get 60 s
    # to end too before srun kills them: preempted ranks all exit 99 after the same checkpoint, but not at
    # the same instant (--kill-on-bad-exit would kill the slower ones, and the job would end with 143
    # instead of 99 and not be requeued); a crashed rank still brings the step down within a minute
    launcher=(srun --wait=60 --export=ALL)
  fi
  local child=""
  forward() {
    log "got SIG$1, forwarding to the trainer (pid ${child:-not started yet})"
    # a warning the trainer cannot receive yet (no handler installed) still reaches it through the file
    [ "$1" = USR1 ] && : > "$FOOTPRINTS_STOP_FILE"
    [ -n "$child" ] && kill -"$1" "$child" 2>/dev/null
  }
  trap 'forward USR1' USR1
  trap 'forward TERM' TERM
  [ -e "$FOOTPRINTS_STOP_FILE" ] && log "the time-limit warning came before the trainer started"
  # python starts with USR1 ignored (kept across exec) so that an early warning cannot kill it before the
  # trainer installs its handler, which replaces the ignore; commands without one carry on
  # shellcheck disable=SC2016 # $@ belongs to the inner shell
  "${launcher[@]}" bash -c 'trap "" USR1; exec "$@"' footprints "$PY" -m footprints.cli "${args[@]}" &
  child=$!
  local rc=0
  # every trapped signal makes `wait` return early; wait again until the child is gone
  while :; do
    wait "$child"; rc=$?
    kill -0 "$child" 2>/dev/null || break
  done
  rm -f "$FOOTPRINTS_STOP_FILE"
  log "footprints exited with $rc"
  if [ "$rc" = 99 ]; then
    if requeue_allowed; then
      log "checkpoint written; requeueing job $SLURM_JOB_ID (it resumes with --load_saved_model)"
      scontrol requeue "$SLURM_JOB_ID"
      exit 0
    fi
    log "checkpoint written; this job may not be requeued: resubmit with --load_saved_model"
  fi
  exit "$rc"
}

# ---- commands ---------------------------------------------------------------------------------
ensure_env || exit 1

CMD=${1:-demo}
case "$CMD" in
  test)
    shift
    cd "$REPO" || exit 1
    log "ruff check"
    "$PY" -m ruff check "$REPO" || exit 1
    log "pytest"
    "$PY" -m pytest "$REPO/tests" "$@"
    exit $?
    ;;
  demo)
    [ $# -gt 0 ] && shift
    cd "$REPO" || exit 1
    CONFIG=configs/demo.yaml
    # (again when an older demo folder lacks the post-disaster pairs the damage stages read)
    if [ ! -d data/demo/images ] || [ -z "$(ls data/demo/images/*_post_disaster.png 2>/dev/null)" ]; then
      "$PY" -m footprints.cli synth --out data/demo --scenes 6 --seed 0 || exit 1
    fi
    # `all` ends by printing the test metrics and the paths of the GeoJSON footprints and the HTML report
    "$PY" -m footprints.cli all --config "$CONFIG" "$@" || exit $?
    echo "demo: these figures come from random backbone weights on synthetic scenes; they show the pipeline" \
      "working end to end, not its accuracy. Figures on real scenes: README.md, 'Results'."
    exit 0
    ;;
esac

if [ -n "${SLURM_JOB_ID:-}" ]; then
  run_under_slurm "$@"
fi
exec "$PY" -m footprints.cli "$@"
