#!/usr/bin/env bash
# One pipeline rank, run once per task by srun (inside the container) from submit.sbatch:
#   srun run.sh --config exp_config.json [--set KEY=VALUE ...]
# Maps Slurm's task ids to torch's RANK/WORLD_SIZE/LOCAL_RANK, makes sure the Python deps import,
# keeps pip-installed torch out of the way of the image's CUDA-matched torch, and runs the runner
# (under Nsight Systems when nsys is on PATH). Exits with the runner's status.
set -euo pipefail

PYTHON=${PYTHON:-python3}
REPO_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
RUNNER=${RUNNER:-}          # default: $PYTHON run_distributed_inference.py (tests substitute a stub)
REQUIREMENTS=${REQUIREMENTS:-$REPO_DIR/requirements.txt}
WHEELHOUSE=${WHEELHOUSE:-}                        # a folder of wheels: offline install with --no-index
PROFILE_DIR=${PROFILE_DIR:-$REPO_DIR/outputs/nsys}
# auto: remove user-site torch/nvidia/triton only inside a container, where the image brings its own torch.
PURGE_USER_TORCH=${PURGE_USER_TORCH:-auto}
# Where missing requirements go: a venv, one per interpreter, that also sees the interpreter's own
# packages (after its own), so that pip counts the image's torch as installed and never fetches another.
PY_ID=$("$PYTHON" -c 'import sys, hashlib; print("%d.%d-%s" % (*sys.version_info[:2], hashlib.sha256(sys.executable.encode()).hexdigest()[:8]))')
DEPS_VENV=${DEPS_VENV:-${HOME:-/tmp}/.cache/pipeinfer/venv-py$PY_ID}

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
    local missing
    missing=$(missing_requirements)
    [[ -z $missing ]] && return 0               # the image has everything
    if [[ ! -x $DEPS_VENV/bin/python ]]; then
        run "$PYTHON" -m venv --without-pip "$DEPS_VENV.tmp" || {
            log "cannot make a venv with $PYTHON -m venv (Debian images need python3-venv): install these in the image instead: $missing"
            rm -rf -- "$DEPS_VENV.tmp"; exit 2; }
        # Not --system-site-packages: where $PYTHON is itself a venv, that would show its base's
        # packages, not its own. A .pth line adds $PYTHON's site directories (and their .pth files).
        # Without a pip of its own the venv runs the image's pip and sees the image's setuptools: a
        # venv's older copies would shadow them and make pip "fix" torch's requirements.
        local image_sites venv_site
        image_sites=$("$PYTHON" -c 'import site; print(repr(site.getsitepackages()))')
        venv_site=$("$DEPS_VENV.tmp/bin/python" -c 'import site; print(site.getsitepackages()[0])')
        echo "import site; list(map(site.addsitedir, $image_sites))" > "$venv_site/zz-pipeinfer-image-site.pth"
        mv -- "$DEPS_VENV.tmp" "$DEPS_VENV"
    fi
    PYTHON=$DEPS_VENV/bin/python                # the image's packages, plus what is installed here
    missing=$(missing_requirements)
    [[ -z $missing ]] && return 0               # installed by an earlier run
    local pip_args=(install --quiet)
    if [[ -n $WHEELHOUSE ]]; then
        [[ -d $WHEELHOUSE ]] || { log "WHEELHOUSE=$WHEELHOUSE is not a folder: fix the path or unset it"; exit 2; }
        pip_args+=(--no-index --find-links "$WHEELHOUSE")
    fi
    # shellcheck disable=SC2086  # one requirement per word
    run "$PYTHON" -m pip "${pip_args[@]}" $missing
}

# Ranks sharing a node (and a $HOME) take turns: one installs or deletes, the others wait.
mkdir -p "$(dirname "$DEPS_VENV")"
exec 9>"$DEPS_VENV.lock"
flock 9
if [[ $PURGE_USER_TORCH == 1 || ($PURGE_USER_TORCH == auto && -n ${APPTAINER_CONTAINER:-${SINGULARITY_CONTAINER:-}}) ]]; then
    purge_user_torch
fi
bootstrap_deps
flock -u 9
exec 9>&-

export PYTHON
if [[ -n $RUNNER ]]; then
    read -r -a runner_cmd <<< "$RUNNER"
else
    runner_cmd=("$PYTHON" "$REPO_DIR/run_distributed_inference.py")   # paths with spaces stay whole
fi
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
