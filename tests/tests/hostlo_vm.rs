//! Hostlo across two real VMs: one pod in two parts, each a CRI pod sandbox
//! (runtime handler `nestless`, the Hostlo annotations passed through
//! containerd's `pod_annotations`) in its own QEMU guest with containerd and
//! our shim; the agent on the host hot-plugs each part's BrFusion NIC and its
//! NIC on the pod's host-loopback segment (see `nestless_tests::e2e`).
//!
//! The pod's services are a busybox httpd container bound to 127.0.0.1 and
//! TCP/UDP echo servers (`nestless-rr`, started in the part's network
//! namespace as a container's process would be). Shown: localhost TCP and UDP
//! from one part to the other, the pod IP from inside and from the host, the
//! same over IPv6 (a dual-stack network: [::1] in a part, the pod's IPv6
//! address from the host), a port conflict reported and cleared, a part restarted, and the last part
//! leaving removes the segment and every NIC and lease. Needs root, QEMU and
//! vhost-device-vsock; it fails, never skips, without them.

use std::time::Duration;

use nestless_tests::{
    e2e::{step, Cluster, ClusterOptions, Guest, Pod},
    hostlo::{
        has_port, http_get, in_pod, rr, start_in_pod, start_part, start_part_declaring, view,
        wait_view,
    },
    netenv::host_links,
};
use serde_json::Value;

const HOSTLO_POD: &str = "shop";
const WEB_PORT: u16 = 8081;
const TCP_PORT: u16 = 8080;
const UDP_PORT: u16 = 5353;
/// How long a port may take to be discovered, published and relayed.
const SETTLE: Duration = Duration::from_secs(120);

/// Retries `f` until it succeeds or [`SETTLE`] passes; then panics with what the parts and
/// the host see of the segment.
fn until<T>(
    what: &str,
    (c, parts, segment): (&Cluster, &[&Pod], &str),
    mut f: impl FnMut() -> Result<T, String>,
) -> T {
    let deadline = std::time::Instant::now() + SETTLE;
    loop {
        match f() {
            Ok(v) => return v,
            Err(e) if std::time::Instant::now() > deadline => panic!(
                "{what}: not within {SETTLE:?}: {e}\n{}",
                diagnostics(c, parts, segment)
            ),
            Err(_) => std::thread::sleep(Duration::from_millis(500)),
        }
    }
}

/// What the parts and the host see of the segment, for failure messages.
fn diagnostics(c: &Cluster, parts: &[&Pod], segment: &str) -> String {
    let mut out = String::new();
    for (i, pod) in parts.iter().enumerate() {
        let node = c.node(i);
        for cmd in [
            "/usr/bin/ip -d addr show dev hostlo0",
            "/usr/bin/ip route",
            "netstat -ltnu",
            "ping -c 2 -W 3 169.254.77.1",
            "ping -c 2 -W 3 169.254.77.2",
            "netstat -tn",
        ] {
            let r = in_pod(node, pod, cmd);
            out += &format!("--- part {i}: {cmd}\n{}\n", r.unwrap_or_else(|e| e));
        }
        out += &format!(
            "--- VM {i} shim log (hostlo)\n{}\n",
            node.vm()
                .exec("grep -v 'Start cri plugin' /var/log/containerd.log | tail -n 60")
                .stdout_str()
        );
    }
    for cmd in [
        vec!["bridge", "link"],
        vec!["ip", "-d", "link", "show", segment],
    ] {
        let r = nestless_tests::netenv::run(&cmd);
        out += &format!(
            "--- host: {}\n{}\n",
            cmd.join(" "),
            String::from_utf8_lossy(&r.stdout)
        );
    }
    out
}

#[test]
fn one_pod_across_two_vms_talks_over_localhost() {
    let c = Cluster::start(ClusterOptions {
        vms: 2,
        ipv6: true,
        ..Default::default()
    });
    let (n0, n1) = (c.node(0), c.node(1));
    let web = format!(
        "mkdir -p /www && echo served-by-part-1 > /www/index.html && \
         exec httpd -f -p 127.0.0.1:{WEB_PORT} -h /www"
    );

    let p0 = step("part 0 in VM 0 (CRI)", || {
        start_part(n0, HOSTLO_POD, 0, "exec sleep 100000")
    });
    let mut p1 = step("part 1 in VM 1 (CRI)", || {
        start_part(n1, HOSTLO_POD, 1, &web)
    });
    // Each part has the pod's segment NIC, hostlo0, with its part address.
    for (node, pod, addr) in [(n0, &p0, "169.254.77.1"), (n1, &p1, "169.254.77.2")] {
        let seg = node.in_netns(pod.pid, "/usr/bin/ip -o -4 addr show dev hostlo0");
        assert!(seg.contains(&format!("{addr}/24")), "{seg}");
    }
    let v = wait_view(&c, SETTLE, "part 1's web port published", |v| {
        has_port(v, &format!("1:{WEB_PORT}/tcp"))
    });
    assert_eq!(v[0]["pod"], HOSTLO_POD, "{v}");
    assert_eq!(
        v[0]["pod_ip"],
        p0.ip.as_str(),
        "part 0's IP is the pod IP: {v}"
    );
    assert_eq!(v[0]["members"].as_array().map(Vec::len), Some(2), "{v}");
    let segment = v[0]["bridge"]
        .as_str()
        .expect("a segment bridge")
        .to_owned();
    assert_eq!(host_links(&segment), vec![segment.clone()]);

    step(
        "localhost TCP: part 0 -> part 1's httpd bound to 127.0.0.1",
        || {
            let got = until(
                "127.0.0.1:WEB from part 0",
                (&c, &[&p0, &p1], &segment),
                || http_get(n0, &p0, &format!("127.0.0.1:{WEB_PORT}")),
            );
            assert!(got.ends_with("served-by-part-1\n"), "{got}");
        },
    );
    step("pod IP: from part 0 and from the host", || {
        let got = until("podIP:WEB from part 0", (&c, &[&p0, &p1], &segment), || {
            http_get(n0, &p0, &format!("{}:{WEB_PORT}", p0.ip))
        });
        assert!(got.ends_with("served-by-part-1\n"), "{got}");
        let got = until(
            "podIP:WEB from the host",
            (&c, &[&p0, &p1], &segment),
            || nestless_tests::e2e::http_get(&p0.ip, WEB_PORT).map_err(|e| e.to_string()),
        );
        assert!(got.ends_with("served-by-part-1\n"), "{got}");
    });

    step(
        "IPv6: [::1] from part 0, the pod's IPv6 address from the host",
        || {
            let got = until("[::1]:WEB from part 0", (&c, &[&p0, &p1], &segment), || {
                http_get(n0, &p0, &format!("::1:{WEB_PORT}"))
            });
            assert!(got.ends_with("served-by-part-1\n"), "{got}");
            let (ip6, _) = n0.eth0_ipv6(p0.pid);
            let got = until(
                "[podIPv6]:WEB from the host",
                (&c, &[&p0, &p1], &segment),
                || nestless_tests::e2e::http_get(&ip6, WEB_PORT).map_err(|e| e.to_string()),
            );
            assert!(got.ends_with("served-by-part-1\n"), "{got}");
        },
    );

    step("localhost TCP and UDP echo: part 1 -> part 0", || {
        start_in_pod(
            n0,
            &p0,
            "tcp",
            &format!("nestless-rr serve 127.0.0.1:{TCP_PORT}"),
        );
        start_in_pod(
            n0,
            &p0,
            "udp",
            &format!("nestless-rr serve-udp 127.0.0.1:{UDP_PORT}"),
        );
        wait_view(&c, SETTLE, "part 0's echo ports published", |v| {
            has_port(v, &format!("0:{TCP_PORT}/tcp")) && has_port(v, &format!("0:{UDP_PORT}/udp"))
        });
        let tcp = until(
            "TCP echo over localhost",
            (&c, &[&p0, &p1], &segment),
            || rr(n1, &p1, "ping", &format!("127.0.0.1:{TCP_PORT}"), 20, 2),
        );
        assert_eq!(tcp["count"], 20, "{tcp}");
        let udp = until(
            "UDP echo over localhost",
            (&c, &[&p0, &p1], &segment),
            || rr(n1, &p1, "ping-udp", &format!("127.0.0.1:{UDP_PORT}"), 20, 2),
        );
        assert_eq!(udp["count"], 20, "{udp}");
        eprintln!("[hostlo] across VMs: TCP {tcp}\n[hostlo] across VMs: UDP {udp}");
    });

    step("a port conflict is reported, then clears", || {
        // A third part (in VM 1) declares TCP_PORT, which part 0 serves.
        let p2 = start_part_declaring(
            n1,
            HOSTLO_POD,
            2,
            Some(&format!("{TCP_PORT}/tcp")),
            "exec sleep 100000",
        );
        let v = wait_view(&c, SETTLE, "the conflict reported", |v| {
            v[0]["conflicts"]
                .as_array()
                .is_some_and(|a| a.iter().any(|x| *x == format!("{TCP_PORT}/tcp")))
        });
        assert_eq!(v[0]["conflicts"].as_array().map(Vec::len), Some(1), "{v}");
        assert_eq!(
            v[0]["conflicting_parts"][format!("{TCP_PORT}/tcp")],
            serde_json::json!([0, 2]),
            "{v}"
        );
        // While it lasts, no part relays the port.
        until(
            "the conflicting port unrelayed",
            (&c, &[&p0, &p1], &segment),
            || match rr(n1, &p1, "ping", &format!("127.0.0.1:{TCP_PORT}"), 2, 0) {
                Ok(v) => Err(format!("still relayed: {v}")),
                Err(_) => Ok(()),
            },
        );
        n1.cri_delete(&p2.id);
        wait_view(&c, SETTLE, "the conflict cleared", |v| {
            v[0]["conflicts"].as_array().is_some_and(|a| a.is_empty())
        });
        let tcp = until(
            "TCP echo after the conflict",
            (&c, &[&p0, &p1], &segment),
            || rr(n1, &p1, "ping", &format!("127.0.0.1:{TCP_PORT}"), 20, 2),
        );
        assert_eq!(tcp["count"], 20, "{tcp}");
    });

    step("part 1 restarts", || {
        n1.cri_delete(&p1.id);
        wait_view(&c, SETTLE, "part 1 gone", |v| {
            v[0]["members"].as_array().is_some_and(|m| m.len() == 1)
        });
        p1 = start_part(n1, HOSTLO_POD, 1, &web);
        let got = until(
            "127.0.0.1:WEB after the restart",
            (&c, &[&p0, &p1], &segment),
            || http_get(n0, &p0, &format!("127.0.0.1:{WEB_PORT}")),
        );
        assert!(got.ends_with("served-by-part-1\n"), "{got}");
    });

    step("the last part leaving removes everything", || {
        n1.cri_delete(&p1.id);
        n0.cri_delete(&p0.id);
        assert_eq!(view(&c), Value::Array(vec![]));
        assert!(host_links(&segment).is_empty(), "segment bridge left");
        assert_eq!(c.records(), vec![], "NICs left");
        assert_eq!(c.leases(), Vec::<Value>::new(), "leases left");
        for node in [n0, n1] {
            assert_eq!(
                node.stray_links(),
                Vec::<String>::new(),
                "NICs left in the VM"
            );
            let ids: Vec<String> = node
                .pci_device_ids()
                .into_iter()
                .filter(|d| d.starts_with("nl-"))
                .collect();
            assert!(ids.is_empty(), "devices left: {ids:?}");
        }
    });
}
