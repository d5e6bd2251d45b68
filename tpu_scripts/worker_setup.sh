#!/usr/bin/env bash
# Runs on every TPU VM worker (from `tpu.py setup`): unpack the code into ~/qed-jax and install
# it with the `tpu` extra into ~/qed-jax-venv. Safe to repeat, or to run again after a stop: the
# code's top-level files and folders are replaced whole (no stale files from an older copy), what
# jobs wrote beside them (an eval's runs/, a judge cache) stays, and the virtual environment is
# reused.
# Usage: worker_setup.sh TARBALL
set -euo pipefail

tarball="$1"
home="${QED_HOME:-$HOME/qed-jax}"
venv="${QED_VENV:-$HOME/qed-jax-venv}"

rm -rf "$home.new"
mkdir -p "$home.new" "$home"
tar -xzf "$tarball" -C "$home.new"
# Jobs start in ~/qed-jax, so their relative outputs land beside the code. The code is replaced
# in place, name by name, so that what jobs wrote never leaves ~/qed-jax, even when this script
# stops half-way. .qed-code lists the code's top-level names: first those of the old copy and
# the new one together (a rerun after a stop then knows both), at the end the new one's alone.
# An entry the new code has but no copy had is a job's: it is first kept under another name
# (NAME.kept, else NAME.kept.2, ...), before the list names it as code.
shopt -s dotglob nullglob
declare -A new_code=() old_code=()
for entry in "$home.new"/*; do new_code[${entry##*/}]=1; done
if [[ -f "$home/.qed-code" ]]; then
  while IFS= read -r name; do old_code[$name]=1; done < "$home/.qed-code"
  for name in "${!new_code[@]}"; do
    entry="$home/$name"
    if [[ -z ${old_code[$name]:-} ]] && [[ -e $entry || -L $entry ]]; then
      kept="$entry.kept" n=1
      while [[ -e $kept || -L $kept ]]; do kept="$entry.kept.$((n += 1))"; done
      mv "$entry" "$kept"
      echo "worker_setup.sh: the code now has $name; the one a job wrote is at $kept" >&2
    fi
  done
fi  # else a copy set up before .qed-code was written: what the new code names is its own code
printf '%s\n' "${!old_code[@]}" "${!new_code[@]}" > "$home/.qed-code.tmp"
mv "$home/.qed-code.tmp" "$home/.qed-code"
for entry in "$home"/*; do
  name=${entry##*/}
  if [[ -n ${old_code[$name]:-} || -n ${new_code[$name]:-} || $name == *.egg-info ]]; then
    rm -rf "$entry"
  fi
done
for entry in "$home.new"/*; do mv "$entry" "$home/"; done
rm -rf "$home.new"
printf '%s\n' "${!new_code[@]}" > "$home/.qed-code.tmp"
mv "$home/.qed-code.tmp" "$home/.qed-code"
shopt -u dotglob nullglob

# TPU VM images ship Ubuntu 22.04's Python 3.10; qed-jax needs 3.11 or newer. uv fetches one
# when no newer Python makes a virtual environment (Ubuntu's cannot without python3.X-venv, and
# leaves one without pip behind: that one is made again).
if ! "$venv/bin/python" -m pip --version >/dev/null 2>&1; then
  rm -rf "$venv"
  python=""
  for candidate in python3.13 python3.12 python3.11; do
    if command -v "$candidate" >/dev/null; then python="$candidate"; break; fi
  done
  if [[ -n "$python" ]] && "$python" -m venv "$venv"; then
    echo "virtual environment made with $python"
  else
    [[ -z "$python" ]] || echo "$python could not make a virtual environment; fetching Python 3.11 with uv"
    rm -rf "$venv"
    python3 -m pip install --user --quiet uv
    "$HOME/.local/bin/uv" venv --seed --python 3.11 "$venv"
  fi
fi

cd "$home"
"$venv/bin/python" -m pip install --quiet --upgrade pip
"$venv/bin/python" -m pip install --quiet -e '.[tpu]'
"$venv/bin/python" -c 'import jax, qed_jax; print("worker ready:", jax.__version__)'
