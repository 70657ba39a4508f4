#!/usr/bin/env bash
# Build studio-agent_<version>_amd64.deb (dh-virtualenv) from this checkout into OUT_DIR
# (default dist/). Usage: packaging/build-deb.sh [OUT_DIR] | --sources
#
# The build runs in a scratch copy of exactly the files that go into the package (--sources
# lists them; tests/services/deb.py hashes the same list to cache the .deb), so the checkout
# gets no build debris, and dpkg-buildpackage's output in ../ lands in the scratch dir.
# Needs: debhelper dh-virtualenv build-essential python3-venv python3-dev, and PyPI.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
SOURCES=(
  agent debian pyproject.toml requirements/runtime.lock README.md
  packaging/agent.yaml packaging/studio-agent.service packaging/monitoring
)
if [ "${1:-}" = --sources ]; then printf '%s\n' "${SOURCES[@]}"; exit 0; fi
out=$(realpath -m "${1:-$root/dist}")

for need in dpkg-buildpackage dh_virtualenv; do
  command -v "$need" >/dev/null || PATH=/usr/sbin:/usr/bin:/sbin:/bin command -v "$need" >/dev/null || {
    echo "build-deb: $need is missing: apt-get install debhelper dh-virtualenv build-essential" >&2
    exit 1
  }
done
for path in "${SOURCES[@]}"; do
  [ -e "$root/$path" ] || { echo "build-deb: $root/$path is missing" >&2; exit 1; }
done

scratch=$(mktemp -d "${TMPDIR:-/tmp}/studio-agent-deb.XXXXXX")
trap 'rm -rf "$scratch"' EXIT
mkdir "$scratch/studio-agent"
tar -C "$root" --exclude=__pycache__ --exclude='*.pyc' --exclude='.*' -cf - "${SOURCES[@]}" |
  tar -C "$scratch/studio-agent" -xf -

# Debian's tools and python3 only: pyenv shims first in PATH break pybuild and dh-virtualenv.
(cd "$scratch/studio-agent" && PATH=/usr/sbin:/usr/bin:/sbin:/bin dpkg-buildpackage -us -uc -b)

mkdir -p "$out"
for built in "$scratch"/*.deb; do
  cp "$built" "$out/"
  echo "built $out/$(basename "$built")"
done
