#!/usr/bin/env bash
# What the test suite needs on this machine, beyond .venv and the client (make installs those):
# Debian packages, Apptainer, /dev/fuse's mode. As root it installs what is missing; as anyone
# else it lists what is missing and the one command to run, and fails. Quick when nothing is
# missing. Called by `make test` and by .ci/run. CHECK_ONLY=1 never installs.
set -euo pipefail
cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive

# Debian packages the build and the tests need (Python 3.11 with venv, a compiler for wheels
# that have none, make, git, and the RabbitMQ server the tests start privately; systemd-nspawn
# and debootstrap boot the system tests' container, tests/services/nspawn.py; debhelper,
# dh-virtualenv and build-essential build the .deb, lintian checks it: make deb, lint-deploy;
# util-linux's setpriv and passwd's useradd: the sandbox tests, tests/integration/test_sandbox.py;
# squashfuse and fuse3: Apptainer run by a slot user mounts the SIF instead of unpacking it;
# prometheus: promtool and a real server for packaging/monitoring, tests/integration/test_monitoring.py).
missing=()
for pkg in python3 python3-venv python3-dev gcc make git ca-certificates rabbitmq-server \
  debootstrap patchelf squashfs-tools uidmap systemd-container util-linux passwd \
  squashfuse fuse3 prometheus \
  debhelper dh-virtualenv lintian build-essential; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done

# While installing, a policy-rc.d that exits 101 stops rabbitmq-server's and prometheus's
# postinsts from starting system servers on the default ports; the tests run their own.
policy=/usr/sbin/policy-rc.d
restore_policy() {
  if [ -e "$policy.ci-saved" ]; then mv -f "$policy.ci-saved" "$policy"; else rm -f "$policy"; fi
}
apptainer_ok=1
command -v apptainer >/dev/null 2>&1 || apptainer_ok=0
if [ "$(id -u)" != 0 ] || [ "${CHECK_ONLY:-0}" = 1 ]; then
  if [ ${#missing[@]} -gt 0 ] || [ "$apptainer_ok" = 0 ]; then
    echo "setup-test-host: missing: ${missing[*]} $([ "$apptainer_ok" = 1 ] || echo apptainer)" >&2
    echo "setup-test-host: as root, run: sudo scripts/setup-test-host.sh   (then make test)" >&2
    exit 1
  fi
  exit 0
fi

if [ ${#missing[@]} -gt 0 ]; then
  # A saved copy left by an interrupted run is the original: keep it.
  if [ -e "$policy" ] && [ ! -e "$policy.ci-saved" ]; then mv -f "$policy" "$policy.ci-saved"; fi
  trap restore_policy EXIT
  printf '#!/bin/sh\nexit 101\n' >"$policy"
  chmod 755 "$policy"
  apt-get update -q
  apt-get install -y -q --no-install-recommends "${missing[@]}"
  restore_policy
  trap - EXIT
fi

# Google's Pub/Sub emulator (with a JRE) comes with this machine image from Google's apt
# repository, which no CI machine here can reach; say so plainly if it is ever missing, rather
# than let the Pub/Sub tests fail on a missing binary.
emulator=/usr/lib/google-cloud-sdk/platform/pubsub-emulator/bin/cloud-pubsub-emulator
if [ ! -x "$emulator" ]; then
  echo "setup-test-host: $emulator is missing (package google-cloud-cli-pubsub-emulator); the pubsub tests will fail" >&2
fi

# /dev/fuse as udev's fuse rule leaves it on any Debian with udev (0666); a machine without udev
# keeps the kernel's 0600, and Apptainer run by a slot user could not mount its image.
if [ -c /dev/fuse ]; then chmod 0666 /dev/fuse; fi

# Apptainer for the container tests (bookworm has no package: sid's, on trixie's glibc);
# it prints "already installed" and returns at once when it is there.
scripts/install-apptainer.sh

