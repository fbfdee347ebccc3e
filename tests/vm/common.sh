# shellcheck shell=bash
# Helpers shared by the guest image scripts: logging, host tools, Debian packages, cache lock.
# Sourced, never run. Everything lands under $NESTLESS_VM_CACHE (default /var/cache/nestless/vm).

set -euo pipefail

CACHE=${NESTLESS_VM_CACHE:-/var/cache/nestless/vm}
DEBS=$CACHE/debs

log() { echo "[nestless-vm] $*" >&2; }
die() {
	echo "[nestless-vm] error: $*" >&2
	exit 1
}

# need_tools TOOL:PACKAGE... installs the packages of the tools that are missing.
need_tools() {
	local pair missing=()
	for pair in "$@"; do
		command -v "${pair%%:*}" >/dev/null || missing+=("${pair#*:}")
	done
	((${#missing[@]})) || return 0
	[ "$(id -u)" = 0 ] || die "missing host packages (run as root to install them): ${missing[*]}"
	log "installing host packages: ${missing[*]}"
	local install=(env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}")
	"${install[@]}" >&2 </dev/null || { apt_update && "${install[@]}" >&2 </dev/null; } ||
		die "cannot install ${missing[*]}"
}

# apt_update runs apt-get update, once per build (a fresh container has no package lists).
apt_update() {
	[ -z "${APT_UPDATED:-}" ] || return 1
	log "apt-get update"
	apt-get update >&2 || die "apt-get update failed"
	APT_UPDATED=1
}

# pin PKG... prints PKG=VERSION for each package, with the version apt would download.
pin() {
	local out
	until out=$(apt-cache policy "$@" 2>/dev/null | awk -v want="$*" '
		/^[^ ]/ { pkg = substr($1, 1, length($1) - 1) }
		$1 == "Candidate:" && $2 != "(none)" { ver[pkg] = $2 }
		END {
			n = split(want, pkgs, " ")
			for (i = 1; i <= n; i++) {
				if (!(pkgs[i] in ver)) { print "no Debian package " pkgs[i] > "/dev/stderr"; exit 1 }
				print pkgs[i] "=" ver[pkgs[i]]
			}
		}'); do
		apt_update || die "apt knows no candidate for some of: $*"
	done
	echo "$out"
}

# kernel_package prints the versioned kernel package that linux-image-amd64 depends on.
kernel_package() {
	local k
	until k=$(apt-cache depends linux-image-amd64 2>/dev/null |
		awk '$1 == "Depends:" && $2 ~ /^linux-image-/ { print $2; exit }') && [ -n "$k" ]; do
		apt_update || die "cannot tell which kernel package linux-image-amd64 depends on"
	done
	echo "$k"
}

# deb_path PKG VERSION prints where the cached .deb of PKG=VERSION is (or will be).
deb_path() { echo "$DEBS/$1_${2//:/%3a}_$(dpkg --print-architecture).deb"; }

# fetch_deb PKG VERSION downloads PKG=VERSION into the cache unless it is there already.
fetch_deb() {
	local f
	f=$(deb_path "$1" "$2")
	[ -f "$f" ] && return 0
	[ -f "$DEBS/$1_${2//:/%3a}_all.deb" ] && return 0
	mkdir -p "$DEBS"
	log "downloading $1=$2"
	(cd "$DEBS" && apt-get download -q -o APT::Sandbox::User=root "$1=$2" >&2) ||
		die "apt-get download $1=$2 failed"
}

# unpack_deb PKG VERSION DIR unpacks a cached .deb into DIR.
unpack_deb() {
	local f
	f=$(deb_path "$1" "$2")
	[ -f "$f" ] || f="$DEBS/$1_${2//:/%3a}_all.deb"
	dpkg-deb -x "$f" "$3"
}

# with_cache_lock serialises builders that share the cache (tests run in parallel).
with_cache_lock() {
	if [ -z "${NESTLESS_VM_LOCK_HELD:-}" ]; then
		mkdir -p "$CACHE"
		exec 9>"$CACHE/.lock"
		flock 9
		export NESTLESS_VM_LOCK_HELD=1
	fi
}

# tree_hash DIR prints a hash of the names, modes and contents of the files under DIR.
tree_hash() {
	(cd "$1" && find . \( -type f -o -type l \) -printf '%p %m %l\n' | LC_ALL=C sort &&
		find . -type f -print0 | LC_ALL=C sort -z | xargs -0r sha256sum) | sha256sum | cut -c1-64
}
