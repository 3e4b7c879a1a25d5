#!/usr/bin/env bash
# Run a command inside the project's pinned virtual environment, creating or updating it first.
#
#   bash tools/env.sh torchrun --nproc_per_node=1 tools/train.py recipes/quickstart.yaml
#   bash tools/env.sh python -m pytest
#
# The venv lives outside the clone, in $FASTTRAIN_CACHE (default ~/.cache/fasttrain), keyed by a
# hash of requirements.txt: a fresh clone (CI) reuses it and set-up is a no-op when it is current.
# The editable install of fasttrain itself (which compiles csrc/, a few minutes) is redone when
# the venv was last installed from another clone, setup.py or csrc/ changed, or the clone has no
# built library.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cache=${FASTTRAIN_CACHE:-$HOME/.cache/fasttrain}
key=$(sha256sum < "$repo/requirements.txt" | cut -c1-16)
venv="$cache/venv-$key"
python=${PYTHON:-python3.11}
command -v "$python" >/dev/null 2>&1 || python=python3

log() { echo "[env] $*" >&2; }

# One set-up at a time per venv (CI and a developer, or two shells, may start together).
mkdir -p "$cache"
exec 9>"$cache/.lock-$key"
flock 9

# FFCV (in requirements.txt) compiles against OpenCV and libjpeg-turbo found through pkg-config,
# and its module links to them at import; fasttrain's region JPEG decoder (csrc/jpeg) builds
# against libjpeg-turbo's libjpeg API: install Debian's packages when they are missing.
if ! { command -v pkg-config >/dev/null && pkg-config --exists opencv4 libturbojpeg libjpeg; }; then
  apt_packages="libopencv-dev libturbojpeg0-dev libjpeg62-turbo-dev pkg-config"
  if ! command -v apt-get >/dev/null; then
    log "error: FFCV and the JPEG decoder need OpenCV 4 and libjpeg-turbo development files visible to pkg-config (Debian: $apt_packages); install them and rerun"
    exit 1
  fi
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  log "installing Debian packages for FFCV and the JPEG decoder: $apt_packages"
  if ! { $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq \
      --no-install-recommends $apt_packages; } > "$cache/apt.log" 2>&1; then
    cat "$cache/apt.log" >&2
    log "error: apt-get install $apt_packages failed (log above, also in $cache/apt.log)"
    exit 1
  fi
fi

if [ ! -f "$venv/.complete" ]; then
  log "creating $venv (first run: a few minutes, torch is a large wheel)"
  rm -rf "$venv"
  "$python" -m venv "$venv"
  # pip warns about every local index folder it skips; those lines say nothing about this project.
  quiet_pip() { "$venv/bin/python" -m pip install --quiet "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }
  quiet_pip --upgrade pip
  quiet_pip -r "$repo/requirements.txt"
  touch "$venv/.complete"
fi

# The editable install records the clone's path and what the native build depends on; redo it
# (which recompiles csrc/) when another clone installed it, or setup.py or csrc/ changed.
sources=$(cd "$repo" && find setup.py csrc -type f 2>/dev/null | LC_ALL=C sort | xargs sha256sum | sha256sum | cut -c1-16)
editable="$repo $sources"
# The build writes the native libraries into the clone (editable install): a clone re-made at the
# same path, or cleaned with `git clean -fdx`, has none although the record still matches.
built=$(compgen -G "$repo/fasttrain/ops/_C.*.so" || true)
if [ "$(cat "$venv/.editable" 2>/dev/null)" != "$editable" ] || [ -z "$built" ]; then
  log "installing fasttrain (editable) from $repo"
  # FASTTRAIN_JPEG=1: the packages above are there, so a decoder build failure is an error.
  if ! FASTTRAIN_JPEG=1 "$venv/bin/python" -m pip install --quiet --no-deps --no-build-isolation -e "$repo" \
      > "$cache/editable-install.log" 2>&1; then
    cat "$cache/editable-install.log" >&2
    log "editable install failed (log above, also in $cache/editable-install.log)"
    exit 1
  fi
  echo "$editable" > "$venv/.editable"
fi
exec 9>&-

export PATH="$venv/bin:$PATH" VIRTUAL_ENV="$venv"
cd "$repo"
if [ $# -eq 0 ]; then
  log "ready: $venv"
  exit 0
fi
exec "$@"
