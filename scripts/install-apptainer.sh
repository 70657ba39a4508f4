#!/usr/bin/env bash
# Install Apptainer on Debian 12 (bookworm), which has no apptainer package.
#
# sid's apptainer .deb needs glibc >= 2.38 and bookworm has 2.36, so the two binaries that
# need it (apptainer and its starter) are patched to load trixie's glibc from /opt/glibc241
# instead; nothing else on the host changes its C library. The trixie/sid package lists live
# in a private apt directory, so the host's sources, lists and package cache are untouched.
#
# Idempotent: a second run prints "already installed" and exits. FORCE=1 reinstalls.
# WITH_FUSE=1 also installs squashfuse/fuse2fs (non-root SIF mounts).
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive

STATE=/var/lib/apptainer-backport
APTDIR=$STATE/apt
MARKER=$STATE/installed
GLIBC=/opt/glibc241
MIRROR=${MIRROR:-http://deb.debian.org/debian}

say() { echo "install-apptainer: $*"; }

[ "$(id -u)" = 0 ] || { say "must run as root"; exit 1; }

if [ "${FORCE:-0}" != 1 ] && [ -f "$MARKER" ] && apptainer --version >/dev/null 2>&1; then
  say "already installed: $(apptainer --version) ($(tr '\n' ' ' <"$MARKER"))"
  exit 0
fi

# -- bookworm dependencies of apptainer (from the host's own apt sources) --
deps=(patchelf squashfs-tools uidmap containernetworking-plugins e2fsprogs ca-certificates)
[ "${WITH_FUSE:-0}" = 1 ] && deps+=(squashfuse fuse2fs)
missing=()
for pkg in "${deps[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  say "apt-get install ${missing[*]}"
  # Wait for another apt run (a CI step beside this one) rather than fail on its lock.
  apt-get -o DPkg::Lock::Timeout=600 update -q
  apt-get -o DPkg::Lock::Timeout=600 install -y -q --no-install-recommends "${missing[@]}"
fi

# -- a private apt that sees trixie and sid --
mkdir -p "$APTDIR"/{etc/apt.conf.d,etc/preferences.d,etc/trusted.gpg.d,lists/partial,cache/archives/partial,debs}
keyring=/usr/share/keyrings/debian-archive-keyring.gpg
cat >"$APTDIR/etc/sources.list" <<EOF
deb [signed-by=$keyring] $MIRROR trixie main
deb [signed-by=$keyring] $MIRROR sid main
EOF
: >"$APTDIR/status.empty"
apt_private=(
  -o "Dir::Etc=$APTDIR/etc" -o "Dir::Etc::sourcelist=$APTDIR/etc/sources.list"
  -o "Dir::Etc::sourceparts=-" -o "Dir::State::Lists=$APTDIR/lists"
  -o "Dir::State::status=$APTDIR/status.empty" -o "Dir::Cache=$APTDIR/cache"
  -o "APT::Architecture=amd64" -o "Debug::NoLocking=1" -o "APT::Sandbox::User=root"
)
say "updating the private trixie/sid package lists in $APTDIR"
apt-get "${apt_private[@]}" update -q
rm -f "$APTDIR"/debs/*.deb
(cd "$APTDIR/debs" && apt-get "${apt_private[@]}" download \
  apptainer/sid libc6/trixie libseccomp2/trixie libsqlite3-0/trixie)

# -- trixie's libc, libseccomp and libsqlite in /opt/glibc241 (swapped in whole) --
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
for deb in "$APTDIR"/debs/{libc6,libseccomp2,libsqlite3-0}_*.deb; do dpkg -x "$deb" "$work/libs"; done
rm -rf "$GLIBC.new"
mkdir -p "$GLIBC.new"
for dir in "$work/libs/lib/x86_64-linux-gnu" "$work/libs/usr/lib/x86_64-linux-gnu"; do
  [ -d "$dir" ] && find "$dir" -maxdepth 1 \( -type f -o -type l \) -name '*.so*' -exec cp -a {} "$GLIBC.new/" \;
done
[ -e "$GLIBC.new/ld-linux-x86-64.so.2" ] || { say "no ld-linux-x86-64.so.2 in libc6"; exit 1; }
rm -rf "$GLIBC.old"
[ -d "$GLIBC" ] && mv "$GLIBC" "$GLIBC.old"
mv "$GLIBC.new" "$GLIBC"
rm -rf "$GLIBC.old"

# -- apptainer itself, its binaries pointed at that libc --
deb=$(ls "$APTDIR"/debs/apptainer_*.deb)
dpkg -x "$deb" "$work/app"
for bin in "$work/app/usr/bin/apptainer" "$work/app/usr/lib/x86_64-linux-gnu/apptainer/bin/starter"; do
  [ -f "$bin" ] || { say "missing $bin in $deb"; exit 1; }
  patchelf --set-interpreter "$GLIBC/ld-linux-x86-64.so.2" --force-rpath --set-rpath "$GLIBC" "$bin"
done
cp -a "$work/app/usr/." /usr/
cp -a "$work/app/var/." /var/  # /var/lib/apptainer/mnt/session: where images get mounted
mkdir -p /etc/apptainer
cp -rn "$work/app/etc/apptainer/." /etc/apptainer/  # -n: keep the operator's local edits
# spython always runs `singularity`: the Debian package provides it as an alternative.
if ! command -v singularity >/dev/null 2>&1; then
  if command -v update-alternatives >/dev/null 2>&1; then
    # The same alternative the package's postinst sets up.
    update-alternatives --install /usr/bin/singularity singularity /usr/bin/singularity.apptainer 50 \
      --slave /usr/bin/run-singularity run-singularity /usr/bin/run-singularity.apptainer
  else
    ln -s apptainer /usr/bin/singularity
  fi
fi

# -- smoke test: a three-file sandbox run the way the agent runs images as root --
sandbox="$work/sandbox"
mkdir -p "$sandbox"/{bin,etc,tmp,proc,sys,dev,var/tmp}
touch "$sandbox"/etc/{passwd,group}
cp /bin/dash "$sandbox/bin/sh"
for lib in $(ldd /bin/dash | grep -o '/[^ ]*'); do
  mkdir -p "$sandbox$(dirname "$lib")"
  cp -L "$lib" "$sandbox$lib"
done
out=$(apptainer exec --no-privs --cleanenv "$sandbox" /bin/sh -c 'echo smoke-ok')
[ "$out" = smoke-ok ] || { say "smoke test failed: $out"; exit 1; }

version=$(apptainer --version)
libc=$(basename "$(ls "$APTDIR"/debs/libc6_*.deb)")
printf 'apptainer=%s\nlibc=%s\ninstalled=%s\n' "$version" "$libc" "$(date -u +%FT%TZ)" >"$MARKER"
say "installed $version with $libc in $GLIBC"
capeff=$(awk '/^CapEff/ { print $2 }' /proc/self/status)
if (( ((0x$capeff >> 24) & 1) == 0 )); then
  say "note: CAP_SYS_RESOURCE is missing here; as root run images with 'apptainer exec --no-privs'"
fi
