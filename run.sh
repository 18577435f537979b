#!/usr/bin/env bash
# One pipeline rank, run once per task by srun (inside the container) from submit.sbatch:
#   srun run.sh --config exp_config.json [--set KEY=VALUE ...]
# Maps Slurm's task ids to torch's RANK/WORLD_SIZE/LOCAL_RANK, makes sure the Python deps import,
# keeps pip-installed torch out of the way of the image's CUDA-matched torch, and runs the runner
# (under Nsight Systems when nsys is on PATH). Exits with the runner's status.
set -euo pipefail

PYTHON=${PYTHON:-python3}
REPO_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
RUNNER=${RUNNER:-"$PYTHON $REPO_DIR/run_distributed_inference.py"}   # tests substitute a stub
REQUIREMENTS=${REQUIREMENTS:-$REPO_DIR/requirements.txt}
WHEELHOUSE=${WHEELHOUSE:-}                        # a folder of wheels: offline install with --no-index
PROFILE_DIR=${PROFILE_DIR:-$REPO_DIR/outputs/nsys}
# auto: remove user-site torch/nvidia/triton only inside a container, where the image brings its own torch.
PURGE_USER_TORCH=${PURGE_USER_TORCH:-auto}
PY_VERSION=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
PIP_TARGET_CACHE=${PIP_TARGET_CACHE:-${HOME:-/tmp}/.cache/pipeinfer/site-py$PY_VERSION}

export RANK=${SLURM_PROCID:-${RANK:-0}}
export WORLD_SIZE=${SLURM_NTASKS:-${WORLD_SIZE:-1}}
export LOCAL_RANK=${SLURM_LOCALID:-${LOCAL_RANK:-0}}

log() { echo "run.sh[rank $RANK]: $*" >&2; }
run() { log "+ $*"; "$@"; }

purge_user_torch() {
    local user_site path
    # Honours PYTHONUSERBASE; exits non-zero when user site-packages are disabled (a venv), path still right.
    user_site=$("$PYTHON" -m site --user-site || true)
    [[ -d $user_site ]] || return 0
    for path in "$user_site"/{torch,torchgen,functorch,triton,nvidia} \
                "$user_site"/{torch,triton}-[0-9]*.{dist,egg}-info "$user_site"/nvidia_*; do
        [[ -e $path ]] || continue
        log "removing user-site $path (it would shadow the image's CUDA-matched torch)"
        rm -rf -- "$path"
    done
}

# Requirement lines whose distribution is not installed (torch is never pip-installed here: it must
# match the node's CUDA driver, so it comes from the image).
missing_requirements() {
    "$PYTHON" - "$REQUIREMENTS" <<'EOF'
import importlib.metadata, re, sys
for line in open(sys.argv[1]):
    line = line.split("#")[0].strip()
    name = re.match(r"[A-Za-z0-9_.-]+", line)
    if not name or line.startswith("-") or re.match(r"(torch|triton|nvidia-)", name[0], re.I):
        continue
    try:
        importlib.metadata.distribution(name[0])
    except importlib.metadata.PackageNotFoundError:
        print(line)
EOF
}

bootstrap_deps() {
    [[ -f $REQUIREMENTS ]] || return 0          # no requirements file: nothing to bootstrap
    export PYTHONPATH=$PIP_TARGET_CACHE${PYTHONPATH:+:$PYTHONPATH}
    local missing stamp
    missing=$(missing_requirements)
    [[ -z $missing ]] && return 0
    stamp=$PIP_TARGET_CACHE/.stamp-$(sha256sum "$REQUIREMENTS" | cut -c1-16)
    [[ -f $stamp ]] && { log "deps cached in $PIP_TARGET_CACHE but still missing: $missing"; return 0; }
    local pip_args=(install --quiet --target "$PIP_TARGET_CACHE")
    if [[ -n $WHEELHOUSE ]]; then
        [[ -d $WHEELHOUSE ]] || { log "WHEELHOUSE=$WHEELHOUSE is not a folder: fix the path or unset it"; exit 2; }
        pip_args+=(--no-index --find-links "$WHEELHOUSE")
    fi
    # shellcheck disable=SC2086  # one requirement per word
    run "$PYTHON" -m pip "${pip_args[@]}" $missing
    touch "$stamp"
}

# Ranks sharing a node (and a $HOME) take turns: one installs or deletes, the others wait.
mkdir -p "$PIP_TARGET_CACHE"
exec 9>"$PIP_TARGET_CACHE/.lock"
flock 9
if [[ $PURGE_USER_TORCH == 1 || ($PURGE_USER_TORCH == auto && -n ${APPTAINER_CONTAINER:-${SINGULARITY_CONTAINER:-}}) ]]; then
    purge_user_torch
fi
bootstrap_deps
flock -u 9
exec 9>&-

read -r -a runner_cmd <<< "$RUNNER"
if command -v nsys >/dev/null; then
    mkdir -p "$PROFILE_DIR"
    export PIPEINFER_NVTX=1
    # %q{RANK} expands to this rank's RANK: one report per rank.
    runner_cmd=(nsys profile "--trace=cuda,nvtx,osrt" --force-overwrite=true
                -o "$PROFILE_DIR/nsys_rank%q{RANK}" "${runner_cmd[@]}")
else
    log "warning: nsys not on PATH: running without the Nsight Systems profile"
fi
log "+ ${runner_cmd[*]} $*"
exec "${runner_cmd[@]}" "$@"
