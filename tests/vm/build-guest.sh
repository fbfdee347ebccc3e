#!/bin/bash
# Build (or find in the cache) a guest image for the real-VM tests: an uncompressed vmlinux
# (QEMU boots it through PVH) and an initramfs, made from Debian packages only.
#
#   tests/vm/build-guest.sh [--variant minimal|full] [--exec-bin FILE] [--extra DIR]
#
#   --variant   minimal (default): busybox, iproute2, modules, the exec server.
#               full: also containerd, ctr, runc, the CNI plugins and busybox/pause OCI
#               archives in /usr/share/nestless/images; the root is copied to a tmpfs.
#   --exec-bin  the nestless-vm-exec binary to ship (env NESTLESS_VM_EXEC_BIN); required.
#   --extra     a directory laid out as a root tree, copied over the image last (our shim,
#               CNI plugin, configs...); the glibc libraries its programs need are added.
#               (env NESTLESS_VM_EXTRA)
#
# Other inputs (env): NESTLESS_VM_CACHE (default /var/cache/nestless/vm),
# NESTLESS_VM_EXTRA_PACKAGES (more Debian packages to unpack, e.g. for libraries),
# NESTLESS_VM_EXTRA_MODULES (more kernel modules to load at boot).
#
# Prints the image directory: vmlinux, initramfs.cpio, manifest. The directory's name
# carries a hash of every input (these scripts, package versions, the exec binary, the
# extra tree), so a change gives a new image and an unchanged input reuses the cached one.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
. "$HERE/common.sh"

VARIANT=minimal
EXEC_BIN=${NESTLESS_VM_EXEC_BIN:-}
EXTRA=${NESTLESS_VM_EXTRA:-}
while (($#)); do
	case $1 in
	--variant) VARIANT=$2 && shift 2 ;;
	--exec-bin) EXEC_BIN=$2 && shift 2 ;;
	--extra) EXTRA=$2 && shift 2 ;;
	*) die "unknown argument $1 (see the header of $0)" ;;
	esac
done
case $VARIANT in minimal | full) ;; *) die "--variant must be minimal or full, not $VARIANT" ;; esac
if [ -z "$EXEC_BIN" ] || [ ! -f "$EXEC_BIN" ]; then
	die "the exec server binary is missing ('$EXEC_BIN'): cargo build -p nestless-tests --bin nestless-vm-exec, then pass --exec-bin"
fi
[ -z "$EXTRA" ] || [ -d "$EXTRA" ] || die "--extra $EXTRA is not a directory"

# Kernel modules loaded at boot (dependencies are added and ordered automatically).
MODULES="virtio_pci virtio_net vmw_vsock_virtio_transport veth overlay tun bridge ${NESTLESS_VM_EXTRA_MODULES:-}"
# Debian packages unpacked into the staging tree; programs are picked from it below.
PACKAGES="busybox-static libc6 libgcc-s1 iproute2 libbpf1 libelf1 libmnl0 libbsd0 libcap2 zlib1g libmd0"
[ "$VARIANT" = full ] && PACKAGES+=" containerd runc containernetworking-plugins libseccomp2"
PACKAGES+=" ${NESTLESS_VM_EXTRA_PACKAGES:-}"

with_cache_lock
# Holding the lock, any work directory left in the cache is from a build that was killed.
find "$CACHE" -mindepth 1 -maxdepth 1 -name 'tmp.*' -exec rm -rf {} +
# QEMU is not needed to build, but whoever builds a guest image is about to boot it.
need_tools dpkg-deb:dpkg xz:xz-utils gzip:gzip busybox:busybox-static flock:util-linux \
	strip:binutils qemu-system-x86_64:qemu-system-x86

KPKG=${NESTLESS_VM_KERNEL_PACKAGE:-$(kernel_package)}
# shellcheck disable=SC2086 # word splitting of the package list is intended
PINNED=$(pin "$KPKG" $PACKAGES | tr '\n' ' ')
PINNED=${PINNED% }

# The exec server as shipped: without symbols, debug info and build id, its hash changes
# only when its code does, not whenever something else in the tests crate changes.
W=$(mktemp -d "$CACHE/tmp.XXXXXX")
trap 'rm -rf "$W"' EXIT
EXEC_SHIPPED=$W/nestless-vm-exec
strip -s --remove-section=.note.gnu.build-id -o "$EXEC_SHIPPED" "$EXEC_BIN" 2>/dev/null ||
	cp "$EXEC_BIN" "$EXEC_SHIPPED"

KEY=$({
	cat "$HERE/build-guest.sh" "$HERE/common.sh" "$HERE"/guest/*
	[ "$VARIANT" = full ] && cat "$HERE/build-busybox-image.sh"
	echo "$VARIANT $PINNED $MODULES"
	sha256sum <"$EXEC_SHIPPED"
	[ -z "$EXTRA" ] || tree_hash "$EXTRA"
} | sha256sum | cut -c1-16)
OUT=$CACHE/images/$VARIANT-$KEY
if [ -f "$OUT/manifest" ]; then
	touch "$OUT/manifest" # marks it used, see the pruning below
	echo "$OUT"
	exit 0
fi
log "building the $VARIANT guest image $OUT"
T0=$(date +%s%N)
for pv in $PINNED; do fetch_deb "${pv%%=*}" "${pv#*=}"; done

# The kernel, unpacked once per version: vmlinux (from vmlinuz's xz payload) and modules.
KVER_PKG=${PINNED%% *}
KDIR=$CACHE/kernel/${KVER_PKG//[=:]/_}
if [ ! -f "$KDIR/.complete" ]; then
	log "unpacking $KVER_PKG"
	rm -rf "$KDIR" && mkdir -p "$KDIR"
	dpkg-deb --fsys-tarfile "$(deb_path "$KPKG" "${KVER_PKG#*=}")" | tar -x -C "$KDIR" --wildcards \
		'./boot/vmlinuz-*' './lib/modules/*/modules.builtin' './lib/modules/*/kernel/net/*' \
		'./lib/modules/*/kernel/drivers/net/*' './lib/modules/*/kernel/drivers/virtio/*' \
		'./lib/modules/*/kernel/fs/*' './lib/modules/*/kernel/lib/*' './lib/modules/*/kernel/crypto/*'
	VMLINUZ=$(echo "$KDIR"/boot/vmlinuz-*)
	# vmlinuz is a decompressor stub followed by the xz-compressed kernel: find the stream.
	# shellcheck disable=SC2013 # one offset per word
	for off in $(LC_ALL=C grep -aboP '\xfd7zXZ\x00' "$VMLINUZ" | cut -d: -f1); do
		tail -c +$((off + 1)) "$VMLINUZ" | xz -dc >"$KDIR/vmlinux" 2>/dev/null || true
		[ "$(head -c 4 "$KDIR/vmlinux")" = $'\x7fELF' ] && break
	done
	[ "$(head -c 4 "$KDIR/vmlinux")" = $'\x7fELF' ] || die "no xz-compressed ELF kernel found in $VMLINUZ"
	touch "$KDIR/.complete"
fi
KVER=$(basename "$(echo "$KDIR"/lib/modules/*)")
KMOD=$KDIR/lib/modules/$KVER

S=$W/staging R=$W/root
mkdir -p "$S"
for pv in ${PINNED#* }; do unpack_deb "${pv%%=*}" "${pv#*=}" "$S"; done

# The root: merged /usr, busybox applets, the programs we want from the staging tree.
mkdir -p "$R"/{usr/bin,usr/lib/x86_64-linux-gnu,usr/lib64,etc/nestless,proc,sys,dev,run,tmp,root,var,mnt,newroot}
ln -s usr/bin "$R/bin" && ln -s usr/bin "$R/sbin" && ln -s bin "$R/usr/sbin"
ln -s usr/lib "$R/lib" && ln -s usr/lib64 "$R/lib64" && ln -s ../run "$R/var/run"
chmod 1777 "$R/tmp"
cp "$S/bin/busybox" "$R/usr/bin/"
for a in $("$S/bin/busybox" --list); do [ "$a" = busybox ] || ln -s busybox "$R/usr/bin/$a"; done
BINS=()
install_bin() { # install_bin FILE...: copy programs into /usr/bin, remember them for ldd
	local f
	for f; do
		rm -f "$R/usr/bin/$(basename "$f")"
		cp "$f" "$R/usr/bin/"
		BINS+=("$R/usr/bin/$(basename "$f")")
	done
}
install_bin "$S/bin/ip" "$S/sbin/bridge"
cp "$EXEC_SHIPPED" "$R/usr/bin/nestless-vm-exec"
BINS+=("$R/usr/bin/nestless-vm-exec")
cp "$HERE/guest/init" "$R/init"
cp "$HERE/guest/inittab" "$R/etc/inittab"
cp "$HERE/guest/rc.sysinit" "$HERE/guest/rc.services" "$R/etc/nestless/"
printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n' >"$R/etc/passwd"
printf 'root:x:0:\nnogroup:x:65534:\n' >"$R/etc/group"
printf '127.0.0.1 localhost\n::1 localhost\n' >"$R/etc/hosts"
mknod -m 600 "$R/dev/console" c 5 1
mknod -m 666 "$R/dev/null" c 1 3

if [ "$VARIANT" = full ]; then
	touch "$R/etc/nestless/switch-root"
	install_bin "$S/usr/bin/containerd" "$S/usr/bin/containerd-shim-runc-v2" "$S/usr/bin/ctr" "$S/usr/sbin/runc"
	mkdir -p "$R/opt/cni/bin" "$R/etc/cni/net.d" "$R/etc/containerd" "$R/usr/share/nestless/images"
	# The plugins a pod network here uses; others (2-3 MB each) can come with --extra.
	for p in bridge host-device host-local loopback portmap ptp static tuning; do
		cp "$S/usr/lib/cni/$p" "$R/opt/cni/bin/" && BINS+=("$R/opt/cni/bin/$p")
	done
	cp "$HERE/guest/containerd.toml" "$R/etc/containerd/config.toml"
	"$HERE/build-busybox-image.sh" --out "$R/usr/share/nestless/images/busybox.tar" >/dev/null
	"$HERE/build-busybox-image.sh" --ref localhost/nestless/pause:test \
		--cmd '["sh","-c","trap \"exit 0\" TERM INT; while :; do sleep 3600 & wait $!; done"]' \
		--out "$R/usr/share/nestless/images/pause.tar" >/dev/null
fi
if [ -n "$EXTRA" ]; then
	cp -a "$EXTRA/." "$R/"
	while IFS= read -r -d '' f; do
		[ "$(head -c 4 "$f")" = $'\x7fELF' ] || continue
		BINS+=("$R/${f#"$EXTRA"/}")
		# Debug builds are mostly debug info: a smaller image boots faster under TCG.
		strip --strip-debug "$R/${f#"$EXTRA"/}" 2>/dev/null || true
	done < <(find "$EXTRA" -type f -perm -u+x -print0)
fi

# Shared libraries: whatever ldd resolves, taken from the staged packages only.
LIBPATH=$S/lib/x86_64-linux-gnu:$S/usr/lib/x86_64-linux-gnu
cp -L "$S/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2" "$R/usr/lib/x86_64-linux-gnu/"
ln -s ../lib/x86_64-linux-gnu/ld-linux-x86-64.so.2 "$R/usr/lib64/ld-linux-x86-64.so.2"
for b in "${BINS[@]}"; do
	out=$(LD_LIBRARY_PATH=$LIBPATH ldd "$b" 2>&1) || continue # static programs
	while read -r lib; do
		case $lib in
		"$S"/*) cp -L -n "$lib" "$R/usr/lib/x86_64-linux-gnu/" ;;
		*) die "$(basename "$b") needs $lib, which no staged package provides (add it to NESTLESS_VM_EXTRA_PACKAGES)" ;;
		esac
	done < <(echo "$out" | awk '$2 == "=>" { if ($3 == "not") { print "missing:" $1 } else { print $3 } }')
done

# Kernel modules: the closure of $MODULES over their "depends=" fields, in load order.
declare -A MODPATH=() SEEN=()
while read -r p; do
	n=$(basename "$p" .ko)
	MODPATH[${n//-/_}]=$p
done < <(cd "$KMOD" && find kernel -name '*.ko')
add_module() {
	local n=${1//-/_} p d
	[ -z "${SEEN[$n]:-}" ] || return 0
	SEEN[$n]=1
	grep -q "/$n.ko\$" <(tr - _ <"$KMOD/modules.builtin") && return 0
	p=${MODPATH[$n]:-}
	[ -n "$p" ] || die "kernel module $n not found in $KVER_PKG"
	for d in $(tr '\0' '\n' <"$KMOD/$p" | sed -n 's/^depends=//p' | tr , ' '); do add_module "$d"; done
	mkdir -p "$(dirname "$R/lib/modules/$KVER/$p")"
	cp "$KMOD/$p" "$R/lib/modules/$KVER/$p"
	strip_signature "$R/lib/modules/$KVER/$p"
	echo "$p" >>"$R/etc/nestless/modules"
}
# Checking a module's signature costs ~20 ms per module under TCG; unsigned modules load
# (tainting the kernel, which tests do not mind). The signature is the file's tail:
# <signature><12-byte header whose last 4 bytes are its length, big-endian><28-byte magic>.
strip_signature() {
	[ "$(tail -c 28 "$1")" = "~Module signature appended~" ] || return 0
	local len
	len=$(tail -c 32 "$1" | head -c 4 | od -An -tu1 | awk '{ print (($1 * 256 + $2) * 256 + $3) * 256 + $4 }')
	truncate -s $(($(stat -c %s "$1") - len - 40)) "$1"
}
for m in $MODULES; do add_module "$m"; done
cp "$KMOD/modules.builtin" "$R/lib/modules/$KVER/"
busybox depmod -b "$R" "$KVER" # so that modprobe works in the guest too

# The image.
mkdir -p "$W/out"
ln "$KDIR/vmlinux" "$W/out/vmlinux" 2>/dev/null || cp "$KDIR/vmlinux" "$W/out/vmlinux"
# Uncompressed: under TCG the guest unpacks a gzipped initramfs at ~8 MB/s.
(cd "$R" && find . | LC_ALL=C sort | busybox cpio -o -H newc 2>/dev/null) >"$W/out/initramfs.cpio"
{
	echo "variant $VARIANT"
	echo "key $KEY"
	echo "kernel $KVER"
	echo "packages $PINNED"
	echo "modules $(tr '\n' ' ' <"$R/etc/nestless/modules")"
	echo "extra ${EXTRA:-none}"
} >"$W/out/manifest"
mkdir -p "$CACHE/images"
mv "$W/out" "$OUT"
# Forget images nobody asked for in two days (each input change leaves one behind).
find "$CACHE/images" -mindepth 2 -maxdepth 2 -name manifest -mtime +2 -printf '%h\0' | xargs -0r rm -rf
log "built $OUT ($(du -sh "$OUT/initramfs.cpio" | cut -f1) initramfs) in $((($(date +%s%N) - T0) / 1000000)) ms"
echo "$OUT"
