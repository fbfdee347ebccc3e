//! The plug against the fake kernel: the 6.1 rename rule with a link manager
//! at work, DAD waits and failures, announcements, a NIC that is another
//! attachment's.

use std::{net::IpAddr, path::Path, time::Duration};

use super::{
    fake::{Dad, FakeKernel, ROOT},
    *,
};

const POD: &str = "/fake/pod";
const MAC: [u8; 6] = [2, 0, 0, 0, 0, 7];
const WAIT: Duration = Duration::from_secs(2);

fn spec(ifname: &str, addresses: &[&str]) -> NicSpec {
    let addresses: Vec<(IpAddr, u8)> = addresses
        .iter()
        .map(|a| {
            let (ip, p) = a.split_once('/').unwrap();
            (ip.parse().unwrap(), p.parse().unwrap())
        })
        .collect();
    let mut routes = Vec::new();
    if addresses.iter().any(|(ip, _)| ip.is_ipv4()) {
        routes.push((
            "0.0.0.0".parse().unwrap(),
            0,
            Some("10.0.0.1".parse().unwrap()),
        ));
    }
    if addresses.iter().any(|(ip, _)| ip.is_ipv6()) {
        routes.push(("::".parse().unwrap(), 0, Some("fd00::1".parse().unwrap())));
    }
    NicSpec {
        mac: MAC,
        ifname: ifname.into(),
        mtu: 1400,
        addresses,
        routes,
    }
}

async fn plug_in(k: &FakeKernel, spec: &NicSpec) -> Result<(), GuestNetError> {
    plug(&k.ns(ROOT), &k.ns(POD), Path::new(POD), spec, WAIT, false).await
}

#[tokio::test]
async fn a_6_1_kernel_refuses_to_rename_an_up_link() {
    // The rule the plug has to live with (the cause of issue 9, item 10).
    let k = FakeKernel::new(&[POD]).linux_6_1().manage(ROOT);
    k.hotplug("eth1", MAC);
    let (_, link, ..) = k.link(MAC).unwrap();
    assert!(link.up, "the link manager brought the new NIC up");
    let e = k
        .ns(ROOT)
        .rename(link.index, "nlm00000001")
        .await
        .unwrap_err();
    assert!(e.is_busy(), "{e}");
    // Down and rename as two requests: the manager brings it up in between.
    k.ns(ROOT).set_up(link.index, false).await.unwrap();
    assert!(k
        .ns(ROOT)
        .rename(link.index, "nlm00000001")
        .await
        .unwrap_err()
        .is_busy());
}

#[tokio::test]
async fn the_plug_moves_and_names_in_one_request_while_a_link_manager_works() {
    for round in 0..20 {
        let k = FakeKernel::new(&[POD]).linux_6_1().manage(ROOT);
        let s = spec("eth0", &["10.0.0.5/24", "fd00::5/64"]);
        // The NIC appears while the plug waits for it (or before, every other round).
        if round % 2 == 0 {
            k.hotplug("eth1", MAC);
        } else {
            let k2 = k.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(5)).await;
                k2.hotplug("eth1", MAC);
            });
        }
        plug_in(&k, &s)
            .await
            .unwrap_or_else(|e| panic!("round {round}: {e}"));
        let (ns, link, mtu, addrs) = k.link(MAC).unwrap();
        assert_eq!(ns, Path::new(POD));
        assert_eq!(
            (link.name.as_str(), link.up, link.running, mtu),
            ("eth0", true, true, 1400)
        );
        assert!(
            addrs.iter().all(|a| !a.tentative && !a.dad_failed),
            "{addrs:?}"
        );
        assert_eq!(addrs.len(), 2);
        // No rename anywhere: the move named it.
        let log = k.log();
        assert!(log.iter().all(|l| !l.contains("rename")), "{log:?}");
        assert!(
            log.iter()
                .any(|l| l.ends_with(&format!("to {POD} as eth0"))),
            "{log:?}"
        );
        assert!(log
            .iter()
            .any(|l| l.contains(": route ") && l.contains("default via 10.0.0.1")));
        assert!(log
            .iter()
            .any(|l| l.contains(": route ") && l.contains("default via fd00::1")));
    }
}

#[tokio::test]
async fn a_transit_name_in_the_pod_is_renamed_down_first() {
    // An older shim left the NIC in the pod as nlm…, and something brought it up.
    let k = FakeKernel::new(&[POD]).linux_6_1();
    k.hotplug("eth1", MAC);
    let (_, link, ..) = k.link(MAC).unwrap();
    k.ns(ROOT)
        .move_to(link.index, Path::new(POD), "nlm0badcafe")
        .await
        .unwrap();
    k.ns(POD).set_up(link.index, true).await.unwrap();
    let s = spec("eth0", &["10.0.0.5/24"]);
    plug_in(&k, &s).await.unwrap();
    let (_, link, ..) = k.link(MAC).unwrap();
    assert_eq!((link.name.as_str(), link.up), ("eth0", true));
    let log = k.log();
    let down = log
        .iter()
        .position(|l| l.contains("set") && l.ends_with("down"))
        .unwrap();
    let rename = log.iter().position(|l| l.contains("rename")).unwrap();
    assert!(down < rename, "{log:?}");
}

#[tokio::test]
async fn a_nic_in_the_pod_under_another_name_is_left_alone() {
    // net1 asked for, but the NIC with the MAC is the pod's eth0 (another
    // attachment's): a clear error, eth0 untouched.
    let k = FakeKernel::new(&[POD]);
    k.hotplug("eth1", MAC);
    plug_in(&k, &spec("eth0", &["10.0.0.5/24"])).await.unwrap();
    let before = k.log().len();
    let e = plug_in(&k, &spec("net1", &["10.0.0.6/24"]))
        .await
        .unwrap_err();
    assert!(matches!(e, GuestNetError::InPodAs { .. }), "{e}");
    assert_eq!(
        e.to_string(),
        "the NIC with MAC 02:00:00:00:00:07 is in the pod already as eth0, not net1: left as it is"
    );
    assert_eq!(k.log().len(), before, "nothing was changed");
    assert_eq!(k.link(MAC).unwrap().1.name, "eth0");
}

#[tokio::test]
async fn a_nic_in_place_and_usable_is_left_as_it_is() {
    let k = FakeKernel::new(&[POD]);
    k.hotplug("eth1", MAC);
    let s = spec("eth0", &["10.0.0.5/24", "fd00::5/64"]);
    plug_in(&k, &s).await.unwrap();
    let before = k.log().len();
    plug_in(&k, &s).await.unwrap();
    assert_eq!(k.log().len(), before);
    assert_eq!(
        check_configured(&k.ns(POD), &s).await.unwrap(),
        NicState::Ready
    );
}

#[tokio::test]
async fn the_plug_returns_once_ipv6_has_passed_dad_with_a_short_timer() {
    let k = FakeKernel::new(&[POD]);
    k.hotplug("eth1", MAC);
    let s = spec("eth0", &["fd00::5/64"]);
    plug_in(&k, &s).await.unwrap();
    let (.., addrs) = k.link(MAC).unwrap();
    assert!(!addrs[0].tentative, "returned with a tentative address");
    // The DAD timer was short while it ran, and is back now; no initial delay.
    let log = k.log();
    assert!(
        log.iter()
            .any(|l| l.ends_with("sysctl ipv6/neigh/eth0/retrans_time_ms=100")),
        "{log:?}"
    );
    assert_eq!(
        k.sysctl(POD, "ipv6/neigh/eth0/retrans_time_ms").as_deref(),
        Some("1000")
    );
    assert_eq!(
        k.sysctl(POD, "ipv6/conf/eth0/router_solicitation_delay")
            .as_deref(),
        Some("0")
    );
    // More than one probe: the first can be lost before the other end
    // forwards (cni::a_duplicate_ipv6_address_fails_add_and_check under load).
    assert_eq!(
        k.sysctl(POD, "ipv6/conf/eth0/dad_transmits").as_deref(),
        Some("3")
    );
    assert_eq!(
        k.sysctl(POD, "ipv6/conf/eth0/ndisc_notify").as_deref(),
        Some("1")
    );
    assert_eq!(
        k.sysctl(POD, "ipv6/conf/eth0/keep_addr_on_down").as_deref(),
        Some("1")
    );
    assert_eq!(
        k.sysctl(POD, "ipv4/conf/eth0/arp_notify").as_deref(),
        Some("1")
    );
}

#[tokio::test]
async fn an_ipv4_only_nic_leaves_the_ipv6_settings_alone() {
    let k = FakeKernel::new(&[POD]);
    k.hotplug("eth1", MAC);
    plug_in(&k, &spec("eth0", &["10.0.0.5/24"])).await.unwrap();
    assert!(
        k.log().iter().all(|l| !l.contains("ipv6/")),
        "{:?}",
        k.log()
    );
}

#[tokio::test]
async fn a_failed_dad_fails_the_plug_and_the_check() {
    let dup: IpAddr = "fd00::5".parse().unwrap();
    let k = FakeKernel::new(&[POD]).dad(Dad::Fails(dup));
    k.hotplug("eth1", MAC);
    let s = spec("eth0", &["10.0.0.5/24", "fd00::5/64"]);
    let e = plug_in(&k, &s).await.unwrap_err();
    assert!(
        matches!(e, GuestNetError::DadFailed { ip, .. } if ip == dup),
        "{e}"
    );
    assert_eq!(
        e.to_string(),
        "address fd00::5 of eth0 is in use elsewhere on the network (IPv6 duplicate address detection failed)"
    );
    assert_eq!(
        check_configured(&k.ns(POD), &s).await.unwrap(),
        NicState::DadFailed(dup)
    );
    // Neither routes nor announcements for an unusable NIC; the timer is back.
    assert!(k.log().iter().all(|l| !l.contains(": route ")));
    assert!(k.announced().is_empty());
    assert_eq!(
        k.sysctl(POD, "ipv6/neigh/eth0/retrans_time_ms").as_deref(),
        Some("1000")
    );
}

#[tokio::test]
async fn dad_that_never_ends_fails_at_the_deadline() {
    let k = FakeKernel::new(&[POD]).dad(Dad::Hangs);
    k.hotplug("eth1", MAC);
    let s = spec("eth0", &["fd00::5/64"]);
    let e = plug(
        &k.ns(ROOT),
        &k.ns(POD),
        Path::new(POD),
        &s,
        Duration::from_millis(200),
        false,
    )
    .await
    .unwrap_err();
    assert_eq!(
        e.to_string(),
        "eth0 was not usable within 200 ms: fd00::5 is still tentative"
    );
}

#[tokio::test]
async fn every_address_is_announced_three_times_once_usable() {
    let k = FakeKernel::new(&[POD]).manage(ROOT);
    k.hotplug("eth1", MAC);
    let s = spec("eth0", &["10.0.0.5/24", "fd00::5/64"]);
    plug_in(&k, &s).await.unwrap();
    let a = k.announced();
    assert_eq!(a.len(), 2 * ANNOUNCE_GAPS.len(), "{a:?}");
    for (ip, _) in &s.addresses {
        assert_eq!(
            a.iter().filter(|(_, x, _)| x == ip).count(),
            ANNOUNCE_GAPS.len()
        );
    }
    assert!(
        a.iter()
            .all(|(ns, _, usable)| ns == Path::new(POD) && *usable),
        "an announcement before the link ran or the address was usable: {a:?}"
    );
}

#[tokio::test]
async fn a_nic_that_never_appears_is_reported_with_its_mac() {
    let k = FakeKernel::new(&[POD]);
    let e = plug(
        &k.ns(ROOT),
        &k.ns(POD),
        Path::new(POD),
        &spec("eth0", &["10.0.0.5/24"]),
        Duration::from_millis(50),
        false,
    )
    .await
    .unwrap_err();
    assert_eq!(
        e.to_string(),
        "no NIC with MAC 02:00:00:00:00:07 appeared within 50 ms (hot-plug not seen by the guest kernel?)"
    );
}

#[test]
fn routes_read_as_ip_route_writes_them() {
    let ip = |s: &str| s.parse::<IpAddr>().unwrap();
    assert_eq!(
        route_text(ip("0.0.0.0"), 0, Some(ip("10.0.0.1"))),
        "default via 10.0.0.1"
    );
    assert_eq!(
        route_text(ip("10.1.0.0"), 16, Some(ip("10.0.0.1"))),
        "10.1.0.0/16 via 10.0.0.1"
    );
    assert_eq!(route_text(ip("fd00::"), 64, None), "fd00::/64 on link");
    assert!(is_transit_name("nlm0badcafe"));
    assert!(!is_transit_name("nlmx"));
    assert!(!is_transit_name("eth0"));
}

#[tokio::test]
async fn an_exclusive_plug_refuses_a_namespace_with_another_managers_interface() {
    // Docker's bridge network: its veth is eth0 (up, default route) before the start.
    let k = FakeKernel::new(&[POD]);
    k.foreign(POD, "eth0", "veth", true);
    k.hotplug("eth1", MAC);
    let s = spec("eth0", &["10.0.0.5/24"]);
    let e = plug(&k.ns(ROOT), &k.ns(POD), Path::new(POD), &s, WAIT, true)
        .await
        .unwrap_err();
    assert!(matches!(e, GuestNetError::NotOurs { .. }), "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains("eth0 (veth)") && msg.contains("--network none"),
        "{msg}"
    );
    // Nothing moved: the NIC is still in the VM's namespace, for the caller to give back.
    let (ns, ..) = k.link(MAC).unwrap();
    assert_eq!(ns, Path::new(ROOT));
    // Not exclusive (a CNI chain's namespace): the plug goes on, and the name clash
    // is the kernel's answer, not a silent second eth0.
    let k = FakeKernel::new(&[POD]);
    k.foreign(POD, "net1", "macvlan", true);
    k.hotplug("eth1", MAC);
    plug(&k.ns(ROOT), &k.ns(POD), Path::new(POD), &s, WAIT, false)
        .await
        .unwrap();
}

#[tokio::test]
async fn an_exclusive_plug_ignores_loopback_fallback_tunnels_and_its_own_nic() {
    let k = FakeKernel::new(&[POD]);
    // Tunnel modules loaded: every namespace gets these, down.
    k.foreign(POD, "tunl0", "ipip", false);
    k.foreign(POD, "sit0", "sit", false);
    k.hotplug("eth1", MAC);
    let s = spec("eth0", &["10.0.0.5/24"]);
    plug(&k.ns(ROOT), &k.ns(POD), Path::new(POD), &s, WAIT, true)
        .await
        .unwrap();
    // Again, with the NIC in place (nestless-cni put it there first): still fine.
    plug(&k.ns(ROOT), &k.ns(POD), Path::new(POD), &s, WAIT, true)
        .await
        .unwrap();
    // A down interface holding the name the NIC needs is another's too.
    let k = FakeKernel::new(&[POD]);
    k.foreign(POD, "eth0", "dummy", false);
    k.hotplug("eth1", MAC);
    let e = plug(&k.ns(ROOT), &k.ns(POD), Path::new(POD), &s, WAIT, true)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("eth0 (dummy)"), "{e}");
}
