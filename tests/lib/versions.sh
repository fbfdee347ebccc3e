# shellcheck shell=bash
# The containerd and Docker versions the tests run side by side, and how they are fetched.
# Sourced by tests/run.sh (and by hand: `. tests/lib/versions.sh && fetch_versions`); never run.
#
# Each version is unpacked (dpkg-deb -x) from Debian's archive into a folder of its own under
# $NESTLESS_VERSIONS_DIR; the system's packages are never replaced. The archive's suites are
# reached through a private apt source list and private lists/cache, so the machine's own apt
# configuration is not touched either.
#
#   containerd 1.6   Debian 12's own (the system package, from tests/lib/setup.sh)
#   containerd 1.7   trixie, pinned below
#   containerd 2.x   sid, whatever it carries, at least the releases with the shim-shutdown fixes
#   Docker 26        trixie docker.io + docker-cli, pinned below, on containerd 1.7
#   Docker 28        sid docker.io + docker-cli (28.x), on containerd 2.x
#
# runc: trixie's and sid's runc need glibc >= 2.38, which Debian 12 lacks, so every version runs
# Debian 12's runc (1.1.5), as a VM image built on Debian 12 would.
#
# The result is $NESTLESS_VERSIONS_DIR/<name>/bin (the programs) and <name>/VERSION (the Debian
# version), for name in containerd-1.6 containerd-1.7 containerd-2 docker-26 docker-28. A
# missing or failed download is an error naming the package: nothing is skipped.

# --- The pins: the one place that names trixie's versions. -------------------------------------
TRIXIE_CONTAINERD=1.7.24~ds1-6+deb13u1
TRIXIE_DOCKER=26.1.5+dfsg1-9+deb13u1+b1
# sid moves daily: its containerd must be 2.x and carry the shim-shutdown fixes (2.0.6 in the
# 2.0 series, 2.1.2 from 2.1 on); its Docker must be 28.x.
SID_CONTAINERD_MIN_20=2.0.6
SID_CONTAINERD_MIN=2.1.2
SID_DOCKER_SERIES=28

NESTLESS_VERSIONS_DIR=${NESTLESS_VERSIONS_DIR:-/var/cache/nestless/versions}
export NESTLESS_VERSIONS_DIR

_versions_apt() {
	local d=$NESTLESS_VERSIONS_DIR/apt
	apt-get -q -o Dir::Etc::sourcelist="$d/sources.list" -o Dir::Etc::sourceparts=- \
		-o Dir::State::lists="$d/lists" -o Dir::Cache="$d/cache" "$@"
}

_versions_cache() {
	local d=$NESTLESS_VERSIONS_DIR/apt
	apt-cache -o Dir::Etc::sourcelist="$d/sources.list" -o Dir::Etc::sourceparts=- \
		-o Dir::State::lists="$d/lists" -o Dir::Cache="$d/cache" "$@"
}

# The version of package $1 that suite $2 (trixie, sid) carries.
_versions_candidate() {
	_versions_cache madison "$1" | awk -F'|' -v s="$2/main" '$3 ~ s {gsub(/ /, "", $2); print $2; exit}'
}

# Downloads package $1 at version $2 and unpacks it into $3 (once; kept for later runs).
_versions_unpack() {
	local pkg=$1 ver=$2 dest=$3 debs=$NESTLESS_VERSIONS_DIR/debs
	if [ -f "$dest/.unpacked-$pkg" ] && [ "$(cat "$dest/.unpacked-$pkg")" = "$ver" ]; then
		return 0
	fi
	mkdir -p "$debs" "$dest"
	local file
	file=$(find "$debs" -maxdepth 1 -name "${pkg}_*.deb" | while read -r f; do
		[ "$(dpkg-deb -f "$f" Version)" = "$ver" ] && echo "$f"
	done | head -n1)
	if [ -z "$file" ]; then
		if ! (cd "$debs" && _versions_apt -o APT::Sandbox::User=root download "$pkg=$ver" >/dev/null); then
			echo "versions: cannot download Debian package $pkg=$ver" >&2
			return 1
		fi
		file=$(find "$debs" -maxdepth 1 -name "${pkg}_*.deb" | while read -r f; do
			[ "$(dpkg-deb -f "$f" Version)" = "$ver" ] && echo "$f"
		done | head -n1)
		[ -n "$file" ] || { echo "versions: the download of $pkg=$ver left no .deb" >&2 && return 1; }
	fi
	dpkg-deb -x "$file" "$dest/root" || { echo "versions: cannot unpack $file ($pkg=$ver)" >&2 && return 1; }
	echo "$ver" >"$dest/.unpacked-$pkg"
}

# Whether Debian version $1 >= upstream version $2.
_versions_at_least() { dpkg --compare-versions "$1" ge "$2"; }

# Links program $2 (a path) into $1/bin, failing if the package did not bring it.
_versions_link() {
	[ -x "$2" ] || { echo "versions: $2 is missing (its package did not ship it)" >&2 && return 1; }
	mkdir -p "$1/bin"
	ln -sfn "$2" "$1/bin/$(basename "${3:-$2}")"
}

_versions_containerd() {
	local name=$1 ver=$2 d=$NESTLESS_VERSIONS_DIR/$1
	_versions_unpack containerd "$ver" "$d" || return 1
	for p in containerd ctr containerd-shim-runc-v2; do
		_versions_link "$d" "$d/root/usr/bin/$p" || return 1
	done
	_versions_link "$d" /usr/sbin/runc || return 1
	echo "$ver" >"$d/VERSION"
	echo "versions: $name = containerd $ver ($("$d/bin/containerd" --version | awk '{print $3}'))"
}

_versions_docker() {
	local name=$1 ver=$2 cli_ver=$3 containerd=$4 d=$NESTLESS_VERSIONS_DIR/$1
	_versions_unpack docker.io "$ver" "$d" || return 1
	_versions_unpack docker-cli "$cli_ver" "$d" || return 1
	_versions_link "$d" "$d/root/usr/sbin/dockerd" || return 1
	_versions_link "$d" "$d/root/usr/bin/docker" || return 1
	# dockerd runs the containerd of the same suite (started by the test, not by dockerd).
	for p in containerd ctr containerd-shim-runc-v2 runc; do
		ln -sfn "$NESTLESS_VERSIONS_DIR/$containerd/bin/$p" "$d/bin/$p"
	done
	echo "$containerd" >"$d/CONTAINERD"
	echo "$ver" >"$d/VERSION"
	echo "versions: $name = docker.io $ver ($("$d/bin/dockerd" --version)), on $containerd"
}

# Fetches and unpacks every version (idempotent: what is there already is kept).
fetch_versions() {
	local a=$NESTLESS_VERSIONS_DIR/apt
	mkdir -p "$a/lists/partial" "$a/cache/archives/partial"
	cat >"$a/sources.list" <<-'EOF'
		deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian trixie main
		deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian sid main
	EOF
	_versions_apt update -qq || { echo "versions: apt-get update of trixie and sid failed" >&2 && return 1; }

	# containerd 1.6: the system's.
	local d=$NESTLESS_VERSIONS_DIR/containerd-1.6
	rm -rf "$d/bin"
	for p in /usr/bin/containerd /usr/bin/ctr /usr/bin/containerd-shim-runc-v2 /usr/sbin/runc; do
		_versions_link "$d" "$p" || return 1
	done
	dpkg-query -W -f='${Version}\n' containerd >"$d/VERSION"
	echo "versions: containerd-1.6 = containerd $(cat "$d/VERSION") (the system's)"

	_versions_containerd containerd-1.7 "$TRIXIE_CONTAINERD" || return 1

	local sid
	sid=$(_versions_candidate containerd sid)
	[ -n "$sid" ] || { echo "versions: sid carries no containerd package" >&2 && return 1; }
	case $sid in
	2.0.*) _versions_at_least "$sid" "$SID_CONTAINERD_MIN_20" ;;
	2.*) _versions_at_least "$sid" "$SID_CONTAINERD_MIN" ;;
	*) false ;;
	esac || {
		echo "versions: sid's containerd $sid is not a 2.x with the shim-shutdown fixes (>= $SID_CONTAINERD_MIN_20 or >= $SID_CONTAINERD_MIN)" >&2
		return 1
	}
	_versions_containerd containerd-2 "$sid" || return 1

	_versions_docker docker-26 "$TRIXIE_DOCKER" "$TRIXIE_DOCKER" containerd-1.7 || return 1
	local dsid csid
	dsid=$(_versions_candidate docker.io sid)
	csid=$(_versions_candidate docker-cli sid)
	case $dsid in
	"$SID_DOCKER_SERIES".*) ;;
	*) echo "versions: sid's docker.io is ${dsid:-missing}, not $SID_DOCKER_SERIES.x" >&2 && return 1 ;;
	esac
	[ -n "$csid" ] || { echo "versions: sid carries no docker-cli package" >&2 && return 1; }
	_versions_docker docker-28 "$dsid" "$csid" containerd-2 || return 1
}
