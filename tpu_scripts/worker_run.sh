#!/usr/bin/env bash
# Runs on every TPU VM worker (from `tpu.py run`), from ~/qed-jax: free the TPU, then replace
# this shell with the job, so its exit code and signals reach the launcher unchanged.
# Usage: worker_run.sh COMMAND [ARG...]
set -euo pipefail

venv="${QED_VENV:-$HOME/qed-jax-venv}"
if [[ ! -x "$venv/bin/python" ]]; then
  echo "worker_run.sh: no virtual environment at $venv; run \`tpu.py setup\` first" >&2
  exit 2
fi

# A job whose ssh connection was cut (a killed launcher, a failed peer) can keep running and
# hold the TPU devices (/dev/accel* on v4, /dev/vfio/* on v5e, v5p, v6e); libtpu then refuses to
# start. Fake local workers (tests) skip this: they must never touch the host's processes.
if [[ "${QED_LOCAL_WORKER:-0}" != 1 ]]; then
  shopt -s nullglob
  devices=(/dev/accel* /dev/vfio/[0-9]*)
  shopt -u nullglob
  if (( ${#devices[@]} )); then
    stale=$(sudo lsof -t "${devices[@]}" 2>/dev/null | sort -u | tr '\n' ' ' || true)
    if [[ -n "${stale// }" ]]; then
      echo "worker_run.sh: stopping stale TPU processes: $stale" >&2
      # shellcheck disable=SC2086  # one argument per pid
      sudo kill -9 $stale || true
      sleep 2
    fi
  fi
  sudo rm -f /tmp/libtpu_lockfile
fi

export VIRTUAL_ENV="$venv" PATH="$venv/bin:$PATH"
echo "worker_run.sh: worker ${QED_WORKER_ID:-?} on $(hostname) runs: $*" >&2
exec "$@"
