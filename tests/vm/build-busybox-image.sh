#!/bin/bash
# Build a one-layer OCI image archive from Debian's busybox-static, for `ctr images import`
# where there is no registry (on the host and in the full guest).
#
#   tests/vm/build-busybox-image.sh [--ref REF] [--cmd JSON] [--out FILE]
#
#   --ref  image name (default localhost/nestless/busybox:test)
#   --cmd  the image's Cmd as a JSON array (default ["sh"]); for a CRI pause image e.g.
#          '["sh","-c","trap \"exit 0\" TERM INT; while :; do sleep 3600 & wait $!; done"]'
#   --out  where to write the archive (default: cached under $NESTLESS_VM_CACHE/oci/)
#
# Prints the archive's path. Import it with: ctr -n NS images import FILE
# The archive is cached: same inputs, same file (and the same digests: the build is reproducible).
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
. "$HERE/common.sh"

REF=localhost/nestless/busybox:test
CMD='["sh"]'
OUT=
while (($#)); do
	case $1 in
	--ref) REF=$2 && shift 2 ;;
	--cmd) CMD=$2 && shift 2 ;;
	--out) OUT=$2 && shift 2 ;;
	*) die "unknown argument $1 (see the header of $0)" ;;
	esac
done

with_cache_lock
need_tools dpkg-deb:dpkg sha256sum:coreutils gzip:gzip tar:tar
BB_VER=$(pin busybox-static)
BB_VER=${BB_VER#*=}
KEY=$( (cat "$HERE/build-busybox-image.sh" "$HERE/common.sh" && echo "$BB_VER $REF $CMD") | sha256sum | cut -c1-16)
CACHED=$CACHE/oci/busybox-$KEY.tar
if [ ! -f "$CACHED" ]; then
	fetch_deb busybox-static "$BB_VER"
	W=$(mktemp -d "$CACHE/tmp.XXXXXX")
	trap 'rm -rf "$W"' EXIT
	unpack_deb busybox-static "$BB_VER" "$W/deb"

	# The root filesystem: busybox, one symlink per applet, and the files a shell expects.
	R=$W/rootfs
	mkdir -p "$R"/{bin,etc,proc,sys,dev,tmp,root,var/run}
	cp "$W/deb/bin/busybox" "$R/bin/busybox"
	for a in $("$R/bin/busybox" --list); do
		[ "$a" = busybox ] || ln -s busybox "$R/bin/$a"
	done
	printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n' >"$R/etc/passwd"
	printf 'root:x:0:\nnogroup:x:65534:\n' >"$R/etc/group"
	chmod 1777 "$R/tmp"

	# One gzipped layer, written reproducibly.
	B=$W/oci/blobs/sha256
	mkdir -p "$B"
	tar -C "$R" --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner -cf "$W/layer.tar" .
	DIFF_ID=$(sha256sum "$W/layer.tar" | cut -d' ' -f1)
	gzip -n -c "$W/layer.tar" >"$W/layer.tar.gz"
	blob() { # blob FILE -> prints "DIGEST SIZE" after moving FILE into the blob store
		local d
		d=$(sha256sum "$1" | cut -d' ' -f1)
		mv "$1" "$B/$d"
		echo "$d $(stat -c %s "$B/$d")"
	}
	read -r LAYER LAYER_SIZE < <(blob "$W/layer.tar.gz")
	printf '{"architecture":"amd64","os":"linux","config":{"Env":["PATH=/bin"],"Cmd":%s,"WorkingDir":"/"},"rootfs":{"type":"layers","diff_ids":["sha256:%s"]}}' \
		"$CMD" "$DIFF_ID" >"$W/config.json"
	read -r CONFIG CONFIG_SIZE < <(blob "$W/config.json")
	printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:%s","size":%s},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"sha256:%s","size":%s}]}' \
		"$CONFIG" "$CONFIG_SIZE" "$LAYER" "$LAYER_SIZE" >"$W/manifest.json"
	read -r MANIFEST MANIFEST_SIZE < <(blob "$W/manifest.json")
	printf '{"imageLayoutVersion":"1.0.0"}' >"$W/oci/oci-layout"
	printf '{"schemaVersion":2,"manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:%s","size":%s,"platform":{"architecture":"amd64","os":"linux"},"annotations":{"io.containerd.image.name":"%s","org.opencontainers.image.ref.name":"%s"}}]}' \
		"$MANIFEST" "$MANIFEST_SIZE" "$REF" "${REF##*:}" >"$W/oci/index.json"

	mkdir -p "$CACHE/oci"
	tar -C "$W/oci" --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner -cf "$W/image.tar" .
	mv "$W/image.tar" "$CACHED"
	log "built OCI image $REF: $CACHED"
fi
if [ -n "$OUT" ]; then
	cp "$CACHED" "$OUT"
	echo "$OUT"
else
	echo "$CACHED"
fi
