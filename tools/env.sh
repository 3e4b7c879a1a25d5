#!/usr/bin/env bash
# Run a command inside the project's pinned virtual environment, creating or updating it first.
#
#   bash tools/env.sh torchrun --nproc_per_node=1 tools/train.py recipes/quickstart.yaml
#   bash tools/env.sh python -m pytest
#
# The venv lives outside the clone, in $FASTTRAIN_CACHE (default ~/.cache/fasttrain), keyed by a
# hash of requirements.txt: a fresh clone (CI) reuses it and set-up is a no-op when it is current.
# PYTHON (default python3.11) is the interpreter a new venv is made from (3.11 or newer).
# The native libraries (csrc/, a few minutes) are built into the clone by an editable install,
# and rebuilt when the clone's record of what they were built for differs: another venv (another
# torch), other setup.py or csrc/ contents, other build settings, a library of the last build
# missing, or no record (an interrupted build). The command runs from the clone's root with the
# clone first on PYTHONPATH, so clones sharing the venv each run their own code (the venv's
# editable install names only the clone that installed last).
set -euo pipefail

log() { echo "[env] $*" >&2; }
fail() { log "error: $*"; exit 1; }
# Ctrl-C during the set-up: pip catches it and exits 1, which read as a failed install with
# its whole log. The command run at the end (exec) gets the default handlers back.
stopped() { log "$1: the set-up did not finish; the next call completes it"; exit "$2"; }
trap 'stopped interrupted 130' INT
trap 'stopped terminated 143' TERM

# This script targets Debian/Ubuntu Linux. Elsewhere (macOS: no flock, BSD realpath) a missing
# command failed midway, after a false "waiting for another set-up" line: say so before any work.
missing=""
need() { missing="${missing:+$missing, }$1"; }
command -v sha256sum >/dev/null 2>&1 || need sha256sum
command -v flock >/dev/null 2>&1 || need flock
realpath -m -- / >/dev/null 2>&1 || need "GNU realpath (-m)"
if [ -n "$missing" ]; then
  fail "not found: $missing. tools/env.sh targets Linux (Debian/Ubuntu: GNU coreutils," \
    "util-linux); elsewhere install torch, then fasttrain as README's 'Environment' says"
fi

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# A quoted '~/x' reaches here unexpanded: the home folder, as the Python side reads it.
tilde() { case $1 in "~") echo "$HOME" ;; "~/"*) echo "$HOME/${1#"~/"}" ;; *) echo "$1" ;; esac; }
cache=$(tilde "${FASTTRAIN_CACHE:-$HOME/.cache/fasttrain}")
mkdir -p "$cache"
cache=$(cd "$cache" && pwd)  # absolute: the command runs from the clone
export FASTTRAIN_CACHE="$cache"  # the command's data default ($FASTTRAIN_CACHE/data) too
if [ -n "${FASTTRAIN_DATA:-}" ]; then
  FASTTRAIN_DATA=$(realpath -m -- "$(tilde "$FASTTRAIN_DATA")")
  export FASTTRAIN_DATA
fi
key=$(sha256sum < "$repo/requirements.txt" | cut -c1-16)
venv="$cache/venv-$key"

# One set-up at a time per venv (CI and a developer, or two shells, may start together). The
# lock is never passed on to child processes (9>&- on each): a pip orphaned by a killed set-up
# would otherwise hold it for as long as it runs.
exec 9>"$cache/.lock-$key"
if ! flock -n 9; then
  log "waiting for another set-up of $venv to finish (lock: $cache/.lock-$key)"
  flock 9
fi

# FFCV (in requirements.txt) compiles against OpenCV and libjpeg-turbo found through pkg-config,
# and its module links to them at import; fasttrain's region JPEG decoder (csrc/jpeg) builds
# against libjpeg-turbo's libjpeg API: install Debian's packages when they are missing.
if ! { command -v pkg-config >/dev/null && pkg-config --exists opencv4 libturbojpeg libjpeg; }; then
  apt_packages="libopencv-dev libturbojpeg0-dev libjpeg62-turbo-dev pkg-config"
  if ! command -v apt-get >/dev/null; then
    fail "FFCV and the JPEG decoder need OpenCV 4 and libjpeg-turbo development files visible to pkg-config (Debian: $apt_packages); install them and rerun"
  fi
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  log "installing Debian packages for FFCV and the JPEG decoder: $apt_packages"
  if ! { $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq \
      --no-install-recommends $apt_packages; } > "$cache/apt.log" 2>&1 9>&-; then
    cat "$cache/apt.log" >&2
    fail "apt-get install $apt_packages failed (log above, also in $cache/apt.log)"
  fi
fi

# Venvs of other requirements whose set-up was interrupted (no .complete) and that no set-up
# holds now: ~6 GB each, never usable.
for other in "$cache"/venv-*; do
  [ -d "$other" ] && [ "$other" != "$venv" ] && [ ! -f "$other/.complete" ] || continue
  if ( flock -n 8 ) 8>"$cache/.lock-${other##*/venv-}"; then
    log "removing $other (an interrupted set-up)"
    rm -rf "$other"
  fi
done

if [ ! -f "$venv/.complete" ]; then
  if [ -n "${PYTHON:-}" ]; then
    python=$PYTHON
  else
    python=python3.11
    command -v "$python" >/dev/null 2>&1 || python=python3
  fi
  # `command -v` passes an inactive pyenv shim: ask the interpreter itself.
  version=$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null 9>&-) \
    || fail "PYTHON=$python: not a working Python interpreter"
  # a program that exits 0 and prints nothing (PYTHON=/bin/true) passed the status check
  [[ $version =~ ^[0-9]+\.[0-9]+$ ]] || fail "PYTHON=$python: not a working Python interpreter"
  "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 9>&- \
    || fail "$python is Python $version; fasttrain needs 3.11 or newer (set PYTHON=python3.11)"
  log "creating $venv with Python $version (first run: a few minutes, torch is a large wheel)"
  rm -rf "$venv"
  "$python" -m venv "$venv" 9>&-
  # pip warns about every local index folder it skips; those lines say nothing about this project.
  quiet_pip() {
    "$venv/bin/python" -m pip install --quiet "$@" 9>&- \
      2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
  }
  quiet_pip --upgrade pip
  quiet_pip -r "$repo/requirements.txt"
  touch "$venv/.complete"
fi

# What the clone's native libraries must have been built for. The record lives in the clone
# (build/ is git-ignored): a clone used with two venvs kept the other torch's build when the
# record lived in the venv, and a clone re-made at the same path, or cleaned with
# `git clean -fdx`, has no libraries although a venv-side record still matched.
sources=$(cd "$repo" && find setup.py csrc -type f -print0 2>/dev/null | LC_ALL=C sort -z \
  | xargs -0 sha256sum | sha256sum | cut -c1-16)
jpeg=${FASTTRAIN_JPEG:-1}  # the packages above are there: a decoder build failure is an error
# CXX: the compiler decides whether _C gets OpenMP (setup.py's probe).
settings="FASTTRAIN_CUDA=${FASTTRAIN_CUDA:-} FASTTRAIN_JPEG=$jpeg TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-} CUDA_HOME=${CUDA_HOME:-} CUDA_PATH=${CUDA_PATH:-} nvcc=$(command -v nvcc || true) CXX=${CXX:-}"
wanted="$venv $sources $settings"
record="$repo/build/.fasttrain-native"
# The record's second line names every library the build left; all must still be there.
built=yes
libs=$(sed -n 2p "$record" 2>/dev/null || true)
for lib in "fasttrain/ops/_C.*.so" $libs; do
  # matched inside the clone: a clone path with [ ] * ? was read as a pattern, never matched
  (cd "$repo" && compgen -G "$lib" >/dev/null) || built=no
done
if [ "$(sed -n 1p "$record" 2>/dev/null)" != "$wanted" ] || [ "$built" = no ]; then
  # One build per clone, held by the pip that builds (unlike the venv's lock): a set-up killed
  # with -9 leaves its pip building on, and a rerun that started a second one beside it failed
  # with both writing the clone and the log.
  mkdir -p "$repo/build"
  exec 8>"$repo/build/.native-build.lock"
  if ! flock -n 8; then
    log "waiting for an earlier build in $repo to finish (its set-up was stopped; lock:" \
      "$repo/build/.native-build.lock)"
    flock 8
  fi
  log "building fasttrain's native libraries (editable install) in $repo"
  log_file="$cache/editable-install-$key.log"
  rm -f "$record"  # an interrupted build leaves no record that could match
  # -v: setup.py's "[fasttrain build]" lines (what was built or left out, and why) reach the
  # log, and are shown from it, once (pip runs setup.py twice), without the rulers.
  if ! FASTTRAIN_JPEG=$jpeg "$venv/bin/python" -m pip install -v --no-deps --no-build-isolation \
      -e "$repo" > "$log_file" 2>&1 9>&-; then
    cat "$log_file" >&2
    fail "editable install failed (log above, also in $log_file)"
  fi
  grep -o '\[fasttrain build\] [^=].*' "$log_file" | awk '!seen[$0]++ { print "[env] " $0 }' >&2 \
    || true
  mkdir -p "$repo/build"
  libs=$(cd "$repo" && for f in fasttrain/ops/_C*.so fasttrain/data/_jpeg*.so; do
    [ ! -e "$f" ] || printf '%s ' "$f"; done)
  printf '%s\n%s\n' "$wanted" "$libs" > "$record"
  exec 8>&-
fi
exec 9>&-

export PATH="$venv/bin:$PATH" VIRTUAL_ENV="$venv"
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
# The folder the user ran this from: `--factory mynet:build` imports mynet from there (the
# command itself runs from the clone, where the README's relative paths hold).
export FASTTRAIN_CALLER_DIR="$PWD"
cd "$repo"
if [ $# -eq 0 ]; then
  log "ready: $venv"
  exit 0
fi
exec "$@"
