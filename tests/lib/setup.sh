# shellcheck shell=bash
# Installation steps shared by tests/run.sh (every test) and tests/demo.sh (the demo), for a
# fresh Debian 12 machine, as root. Sourced, never run; each function is idempotent.

# Debian packages: QEMU for the guests, containerd/runc/CNI plugins (the guest image is made
# from the same packages, and the host tests run them), busybox (ping, cpio), iperf3, ethtool and
# iptables (copied into guests for the benchmark's baselines), protobuf-compiler (the CRI
# client's build), g++ (libFuzzer, built by the fuzz targets' libfuzzer-sys), libvirt (the
# agent's libvirt backend links libvirt.so through the virt crate: libvirt-dev and
# pkg-config; its tests run domains under libvirtd: libvirt-daemon-system, virsh), and the
# usual tools.
APT_PACKAGES=(qemu-system-x86 containerd runc containernetworking-plugins busybox-static iperf3 ethtool socat
	iptables iproute2 xz-utils zstd binutils util-linux kmod systemd protobuf-compiler
	ca-certificates curl gcc g++ libc6-dev debootstrap
	libvirt-daemon-system libvirt-dev libvirt-clients pkg-config)

install_packages() {
	local missing=()
	for p in "${APT_PACKAGES[@]}"; do
		dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
	done
	if ((${#missing[@]})); then
		apt-get update -qq
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
	fi
	# The system containerd is not used: the tests start their own.
	systemctl disable --now containerd >/dev/null 2>&1 || true
}

# Rust through rustup when cargo is missing (Debian's own is too old for the workspace).
install_rust() {
	export PATH="$HOME/.cargo/bin:$PATH"
	command -v cargo >/dev/null && return 0
	curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal \
		--component rustfmt,clippy
	export PATH="$HOME/.cargo/bin:$PATH"
}

# libvirtd for the libvirt tests (tests/tests/agent_libvirt.rs): through systemd where it
# runs, else started by hand (a CI container has no systemd as PID 1), with virtlogd which it
# needs. Fails loudly when libvirtd does not answer on qemu:///system afterwards.
start_libvirtd() {
	if ! virsh -c qemu:///system version >/dev/null 2>&1; then
		if [ -d /run/systemd/system ]; then
			systemctl start virtlogd.socket libvirtd.service || true
		else
			pgrep -x virtlogd >/dev/null || virtlogd -d
			pgrep -x libvirtd >/dev/null || libvirtd -d
		fi
	fi
	local i
	# Up to 60 s: libvirtd probes its drivers at start, slowly on a loaded machine.
	for i in $(seq 1 600); do
		virsh -c qemu:///system version >/dev/null 2>&1 && return 0
		sleep 0.1
	done
	echo "start_libvirtd: libvirtd does not answer on qemu:///system:" >&2
	virsh -c qemu:///system version >&2 || true
	return 1
}

install_vhost_device_vsock() {
	if ! command -v vhost-device-vsock >/dev/null || ! vhost-device-vsock --version 2>/dev/null | grep -q "0.3.0"; then
		cargo install --locked vhost-device-vsock@0.3.0
	fi
}

# cargo-fuzz, for the fuzz phase of tests/run.sh (fuzz/README.md); a pinned version from
# crates.io. It runs on stable Rust with --sanitizer none (tests/run.sh).
install_cargo_fuzz() {
	if ! cargo fuzz --version 2>/dev/null | grep -qx "cargo-fuzz 0.13.2"; then
		cargo install --locked cargo-fuzz@0.13.2
	fi
}
