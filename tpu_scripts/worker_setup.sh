#!/usr/bin/env bash
# Runs on every TPU VM worker (from `tpu.py setup`): unpack the code into ~/qed-jax and install
# it with the `tpu` extra into ~/qed-jax-venv. Safe to repeat: the code is replaced as a whole
# (no stale files from an older copy), what jobs wrote there (an eval's runs/, a judge cache) is
# kept, and the virtual environment is reused.
# Usage: worker_setup.sh TARBALL
set -euo pipefail

tarball="$1"
home="${QED_HOME:-$HOME/qed-jax}"
venv="${QED_VENV:-$HOME/qed-jax-venv}"

rm -rf "$home.new"
mkdir -p "$home.new"
tar -xzf "$tarball" -C "$home.new"
# Jobs start in ~/qed-jax, so their relative outputs land beside the code. An entry there that is
# neither in the new code nor in the older copy's (whose top-level names .qed-code lists) is a
# job's, and moves into the new copy; one the new code also has is kept under another name.
shopt -s dotglob nullglob
declare -A new_code=() old_code=()
for entry in "$home.new"/*; do new_code[${entry##*/}]=1; done
if [[ -f "$home/.qed-code" ]]; then
  while IFS= read -r name; do old_code[$name]=1; done < "$home/.qed-code"
fi
for entry in "$home"/*; do
  name=${entry##*/}
  if [[ -n ${old_code[$name]:-} || $name == .qed-code || $name == *.egg-info ]]; then
    continue
  elif [[ -z ${new_code[$name]:-} ]]; then
    mv "$entry" "$home.new/"
  elif [[ -f "$home/.qed-code" ]]; then
    mv "$entry" "$home.new/$name.kept"
    echo "worker_setup.sh: the code now has $name; the one a job wrote is at $home/$name.kept" >&2
  fi
done
printf '%s\n' "${!new_code[@]}" > "$home.new/.qed-code"
shopt -u dotglob nullglob
rm -rf "$home"
mv "$home.new" "$home"

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
