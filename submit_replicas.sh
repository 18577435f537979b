#!/usr/bin/env bash
# Replicas on Slurm: the config's `replicas` pipelines as one job array of submit.sbatch (task i runs
# replica i on pipeline_size nodes, starting as nodes free up), then the merge as a job that runs
# after every task has ended (--dependency=afterany). Run from the repo root, on the login node:
#   EXP_CONFIG=my.json bash submit_replicas.sh [--set KEY=VALUE ...]
#   ARRAY=1,3 EXP_CONFIG=my.json bash submit_replicas.sh ...   # only those replicas, then the merge
# The merge prints this second form, with the incomplete replicas, when a share is missing prompts.
# The environment sbatch passes on reaches submit.sbatch (CONTAINER_IMAGE, PYTHON, MODULES, ...).
set -euo pipefail

REPO_DIR=${REPO_DIR:-$PWD}
EXP_CONFIG=${EXP_CONFIG:-exp_config.json}
HOST_PYTHON=${HOST_PYTHON:-${PYTHON:-python3}}   # standard library only
LOG_DIR=${LOG_DIR:-.}                             # the jobs' logs: %x-%A_%a.out (tasks), %x-%j.out (merge)
ARRAY=${ARRAY:-}                                  # default: every replica, 0..replicas-1

cd "$REPO_DIR"
die() { echo "submit_replicas.sh: error: $*" >&2; exit 2; }
facts=$("$HOST_PYTHON" -m pipeinfer.config "$EXP_CONFIG" "$@" --fields pipeline_size replicas) || exit 2
{ read -r PIPELINE_SIZE; read -r REPLICAS; } <<< "$facts"
[[ $REPLICAS -ge 2 ]] || die "replicas=$REPLICAS in $EXP_CONFIG: set replicas >= 2 (--set replicas=4), or submit submit.sbatch alone"
ARRAY=${ARRAY:-0-$((REPLICAS - 1))}

# The command that reruns some replicas: this one, with ARRAY={tasks} and the same environment.
again="ARRAY={tasks}"
for var in EXP_CONFIG REPO_DIR CONTAINER_IMAGE PYTHON HOST_PYTHON MODULES LOG_DIR; do
    [[ -z ${!var+x} ]] || again+=" $var=$(printf %q "${!var}")"
done
again+=" bash $(printf %q "$REPO_DIR/submit_replicas.sh")"
for arg in "$@"; do again+=" $(printf %q "$arg")"; done

mkdir -p "$LOG_DIR"
echo "+ sbatch --array=$ARRAY --nodes=$PIPELINE_SIZE submit.sbatch $*"
array_job=$(sbatch --parsable --array="$ARRAY" --nodes="$PIPELINE_SIZE" --output="$LOG_DIR/%x-%A_%a.out" \
            submit.sbatch "$@")
array_job=${array_job%%;*}
merge=("$HOST_PYTHON" -m pipeinfer.record.replicas --config "$EXP_CONFIG" "$@" --resubmit "$again")
echo "+ sbatch --dependency=afterany:$array_job ${merge[*]}"
merge_job=$(sbatch --parsable --dependency="afterany:$array_job" --job-name=pipeinfer-merge --nodes=1 --ntasks=1 \
            --output="$LOG_DIR/%x-%j.out" --wrap="cd $(printf %q "$REPO_DIR") && $(printf '%q ' "${merge[@]}")")
echo "replicas: array job ${array_job} (tasks $ARRAY), merge job ${merge_job%%;*}"
