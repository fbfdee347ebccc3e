#!/bin/bash
# Build a one-layer OCI image archive holding a static pause program (pause.c), for
# `ctr images import` where there is no registry: the CRI plugin's sandbox_image.
#
#   tests/containerd/build-pause-image.sh [--ref REF] [--out FILE]
#
#   --ref  image name (default localhost/nestless/pause:test)
#   --out  where to write the archive (default: cached under $NESTLESS_CONTAINERD_CACHE,
#          default /var/cache/nestless/containerd)
#
# Prints the archive's path. Needs gcc and the static C library (libc6-dev), sha256sum,
# gzip and tar. The archive is cached: same inputs, same file.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CACHE=${NESTLESS_CONTAINERD_CACHE:-/var/cache/nestless/containerd}
REF=localhost/nestless/pause:test
OUT=
die() {
	echo "[nestless-containerd] error: $*" >&2
	exit 1
}
while (($#)); do
	case $1 in
	--ref) REF=$2 && shift 2 ;;
	--out) OUT=$2 && shift 2 ;;
	*) die "unknown argument $1 (see the header of $0)" ;;
	esac
done
for t in gcc sha256sum gzip tar; do
	command -v "$t" >/dev/null || die "$t is missing (apt-get install -y gcc libc6-dev coreutils gzip tar)"
done

mkdir -p "$CACHE"
exec 9>"$CACHE/.lock"
flock 9
KEY=$( (cat "$0" "$HERE/pause.c" && gcc --version | head -1 && echo "$REF") | sha256sum | cut -c1-16)
CACHED=$CACHE/pause-$KEY.tar
if [ ! -f "$CACHED" ]; then
	W=$(mktemp -d "$CACHE/tmp.XXXXXX")
	trap 'rm -rf "$W"' EXIT
	mkdir -p "$W/rootfs"
	gcc -static -Os -s -o "$W/rootfs/pause" "$HERE/pause.c" || die "cannot build pause.c statically (is libc6-dev installed?)"

	B=$W/oci/blobs/sha256
	mkdir -p "$B"
	tar -C "$W/rootfs" --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner -cf "$W/layer.tar" .
	DIFF_ID=$(sha256sum "$W/layer.tar" | cut -d' ' -f1)
	gzip -n -c "$W/layer.tar" >"$W/layer.tar.gz"
	blob() { # blob FILE -> prints "DIGEST SIZE" after moving FILE into the blob store
		local d
		d=$(sha256sum "$1" | cut -d' ' -f1)
		mv "$1" "$B/$d"
		echo "$d $(stat -c %s "$B/$d")"
	}
	read -r LAYER LAYER_SIZE < <(blob "$W/layer.tar.gz")
	printf '{"architecture":"amd64","os":"linux","config":{"Entrypoint":["/pause"],"WorkingDir":"/"},"rootfs":{"type":"layers","diff_ids":["sha256:%s"]}}' \
		"$DIFF_ID" >"$W/config.json"
	read -r CONFIG CONFIG_SIZE < <(blob "$W/config.json")
	printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:%s","size":%s},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"sha256:%s","size":%s}]}' \
		"$CONFIG" "$CONFIG_SIZE" "$LAYER" "$LAYER_SIZE" >"$W/manifest.json"
	read -r MANIFEST MANIFEST_SIZE < <(blob "$W/manifest.json")
	printf '{"imageLayoutVersion":"1.0.0"}' >"$W/oci/oci-layout"
	printf '{"schemaVersion":2,"manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:%s","size":%s,"platform":{"architecture":"amd64","os":"linux"},"annotations":{"io.containerd.image.name":"%s","org.opencontainers.image.ref.name":"%s"}}]}' \
		"$MANIFEST" "$MANIFEST_SIZE" "$REF" "${REF##*:}" >"$W/oci/index.json"
	tar -C "$W/oci" --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner -cf "$W/image.tar" .
	mv "$W/image.tar" "$CACHED"
	echo "[nestless-containerd] built OCI image $REF: $CACHED" >&2
fi
if [ -n "$OUT" ]; then
	cp "$CACHED" "$OUT"
	echo "$OUT"
else
	echo "$CACHED"
fi
