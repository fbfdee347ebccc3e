//! A fake kernel behind [`NsLinks`], for the plug's unit tests: namespaces
//! of links with addresses, the rules that matter here, and the software
//! that touches links behind the plug's back.
//!
//! - **Linux before 6.2** ([`FakeKernel::linux_6_1`]): renaming an up link
//!   is `EBUSY`. A move into another namespace takes the link down and names
//!   it there, as one request.
//! - **Link manager** ([`FakeKernel::manage`]): after every request, every
//!   link of the managed namespace is brought up (as systemd-networkd or
//!   NetworkManager do with new links).
//! - **Carrier**: a link that is set up runs (`IFF_RUNNING`) a moment later,
//!   as the kernel's link watch does it.
//! - **DAD**: an IPv6 address is tentative until its link runs, then passes
//!   or fails a moment later ([`Dad`]).
//!
//! Every change wakes the namespace's watchers. Sysctls, routes and
//! announcements are recorded.

use std::{
    collections::HashMap,
    net::IpAddr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::sync::watch;

use super::{
    links::{Addr, Changes, Link, NsLinks},
    GuestNetError,
};

/// The VM's own namespace in the fake.
pub const ROOT: &str = "/fake/root";

/// How duplicate address detection ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dad {
    /// Every address passes.
    Passes,
    /// This address fails.
    Fails(IpAddr),
    /// It never ends.
    Hangs,
}

/// How long the fake's carrier and DAD take.
const SETTLE: Duration = Duration::from_millis(15);

#[derive(Debug, Clone)]
struct FakeLink {
    link: Link,
    mtu: u32,
    addrs: Vec<Addr>,
}

struct Kernel {
    next_index: u32,
    namespaces: HashMap<PathBuf, Vec<FakeLink>>,
    busy_rename_when_up: bool,
    managed: Option<PathBuf>,
    dad: Dad,
    sysctls: HashMap<(PathBuf, String), String>,
    log: Vec<String>,
    /// (namespace, address, whether the link ran and the address was usable)
    announced: Vec<(PathBuf, IpAddr, bool)>,
    changed: watch::Sender<u64>,
}

/// The fake kernel; [`FakeKernel::ns`] gives a namespace's [`NsLinks`].
#[derive(Clone)]
pub struct FakeKernel(Arc<Mutex<Kernel>>);

fn err(op: &'static str, what: impl Into<String>, errno: i32) -> GuestNetError {
    GuestNetError::Netlink {
        op,
        what: what.into(),
        error: std::io::Error::from_raw_os_error(errno),
    }
}

impl FakeKernel {
    /// A kernel with the VM's namespace (`lo` only), and `pods` empty
    /// namespaces (`lo` only) at the given paths.
    pub fn new(pods: &[&str]) -> FakeKernel {
        let mut k = Kernel {
            next_index: 1,
            namespaces: HashMap::new(),
            busy_rename_when_up: false,
            managed: None,
            dad: Dad::Passes,
            sysctls: HashMap::new(),
            log: Vec::new(),
            announced: Vec::new(),
            changed: watch::channel(0).0,
        };
        for ns in std::iter::once(ROOT).chain(pods.iter().copied()) {
            let index = k.next_index;
            k.next_index += 1;
            k.namespaces.insert(
                PathBuf::from(ns),
                vec![FakeLink {
                    link: Link {
                        index,
                        name: "lo".into(),
                        mac: None,
                        up: false,
                        running: false,
                        kind: None,
                    },
                    mtu: 65536,
                    addrs: Vec::new(),
                }],
            );
            k.sysctls.insert(
                (
                    PathBuf::from(ns),
                    "ipv6/neigh/default/retrans_time_ms".into(),
                ),
                "1000".into(),
            );
        }
        FakeKernel(Arc::new(Mutex::new(k)))
    }

    /// Renames of up links are `EBUSY`, as before Linux 6.2.
    pub fn linux_6_1(self) -> Self {
        self.0.lock().unwrap().busy_rename_when_up = true;
        self
    }

    /// A link manager brings every link of `ns` up after each request.
    pub fn manage(self, ns: &str) -> Self {
        self.0.lock().unwrap().managed = Some(PathBuf::from(ns));
        self
    }

    /// How DAD ends.
    pub fn dad(self, dad: Dad) -> Self {
        self.0.lock().unwrap().dad = dad;
        self
    }

    /// The namespace at `path`.
    pub fn ns(&self, path: &str) -> FakeNs {
        FakeNs {
            kernel: self.clone(),
            path: PathBuf::from(path),
        }
    }

    /// A NIC appears in the VM's namespace, named `name` (hot-plug).
    pub fn hotplug(&self, name: &str, mac: [u8; 6]) {
        let mut k = self.0.lock().unwrap();
        let index = k.next_index;
        k.next_index += 1;
        let link = FakeLink {
            link: Link {
                index,
                name: name.into(),
                mac: Some(mac),
                up: false,
                running: false,
                kind: None,
            },
            mtu: 1500,
            addrs: Vec::new(),
        };
        k.namespaces.get_mut(Path::new(ROOT)).unwrap().push(link);
        drop(k);
        self.after_request();
    }

    /// Another network manager's link in namespace `ns` (Docker's veth, a
    /// kernel's fallback tunnel device), up or down.
    pub fn foreign(&self, ns: &str, name: &str, kind: &str, up: bool) {
        let mut k = self.0.lock().unwrap();
        let index = k.next_index;
        k.next_index += 1;
        let link = FakeLink {
            link: Link {
                index,
                name: name.into(),
                mac: Some([2, 0x42, 0xac, 0x11, 0, index as u8]),
                up,
                running: up,
                kind: Some(kind.into()),
            },
            mtu: 1500,
            addrs: Vec::new(),
        };
        k.namespaces.get_mut(Path::new(ns)).unwrap().push(link);
    }

    /// The link with `mac`: (namespace, link, mtu, addresses).
    pub fn link(&self, mac: [u8; 6]) -> Option<(PathBuf, Link, u32, Vec<Addr>)> {
        let k = self.0.lock().unwrap();
        k.namespaces.iter().find_map(|(ns, links)| {
            links
                .iter()
                .find(|l| l.link.mac == Some(mac))
                .map(|l| (ns.clone(), l.link.clone(), l.mtu, l.addrs.clone()))
        })
    }

    /// The requests so far, e.g. `/fake/root: move 3 to /fake/pod as eth0`.
    pub fn log(&self) -> Vec<String> {
        self.0.lock().unwrap().log.clone()
    }

    /// The value of a sysctl of a namespace.
    pub fn sysctl(&self, ns: &str, key: &str) -> Option<String> {
        self.0
            .lock()
            .unwrap()
            .sysctls
            .get(&(PathBuf::from(ns), key.to_owned()))
            .cloned()
    }

    /// Every announcement: (namespace, address, whether it went out on a
    /// running link with the address usable).
    pub fn announced(&self) -> Vec<(PathBuf, IpAddr, bool)> {
        self.0.lock().unwrap().announced.clone()
    }

    /// The link manager's turn, and the watchers' wake-up.
    fn after_request(&self) {
        let mut k = self.0.lock().unwrap();
        let mut started = Vec::new();
        if let Some(managed) = k.managed.clone() {
            for l in k.namespaces.get_mut(&managed).into_iter().flatten() {
                if !l.link.up {
                    l.link.up = true;
                    started.push(l.link.index);
                }
            }
        }
        k.changed.send_modify(|v| *v += 1);
        drop(k);
        for index in started {
            self.link_came_up(index);
        }
    }

    /// A moment after a link is set up, it runs; a moment later its IPv6
    /// addresses end DAD.
    fn link_came_up(&self, index: u32) {
        let kernel = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(SETTLE).await;
            kernel.with_link(index, |l, _| l.link.running = l.link.up);
            tokio::time::sleep(SETTLE).await;
            kernel.settle_dad(index);
        });
    }

    fn settle_dad(&self, index: u32) {
        let dad = self.0.lock().unwrap().dad;
        self.with_link(index, |l, _| {
            if !l.link.running {
                return;
            }
            for a in l.addrs.iter_mut().filter(|a| a.tentative) {
                match dad {
                    Dad::Passes => a.tentative = false,
                    Dad::Fails(ip) if ip == a.ip => a.dad_failed = true,
                    Dad::Fails(_) => a.tentative = false,
                    Dad::Hangs => {}
                }
            }
        });
    }

    fn with_link<T>(&self, index: u32, f: impl FnOnce(&mut FakeLink, &Path) -> T) -> Option<T> {
        let mut k = self.0.lock().unwrap();
        let mut f = Some(f);
        let found = k.namespaces.iter_mut().find_map(|(ns, links)| {
            let l = links.iter_mut().find(|l| l.link.index == index)?;
            f.take().map(|f| f(l, ns))
        });
        k.changed.send_modify(|v| *v += 1);
        found
    }
}

/// One namespace of a [`FakeKernel`].
pub struct FakeNs {
    kernel: FakeKernel,
    path: PathBuf,
}

struct Watcher(watch::Receiver<u64>);

#[async_trait::async_trait]
impl Changes for Watcher {
    async fn next(&mut self) -> bool {
        self.0.changed().await.is_ok()
    }
}

impl FakeNs {
    fn note(&self, what: String) {
        self.kernel
            .0
            .lock()
            .unwrap()
            .log
            .push(format!("{}: {what}", self.path.display()));
    }

    /// Runs `f` on link `index` of this namespace.
    fn on_link<T>(
        &self,
        op: &'static str,
        index: u32,
        f: impl FnOnce(&mut FakeLink) -> Result<T, GuestNetError>,
    ) -> Result<T, GuestNetError> {
        let mut k = self.kernel.0.lock().unwrap();
        let links = k
            .namespaces
            .get_mut(&self.path)
            .expect("a namespace of the fake");
        let link = links
            .iter_mut()
            .find(|l| l.link.index == index)
            .ok_or_else(|| err(op, format!("link {index}"), libc::ENODEV))?;
        f(link)
    }
}

#[async_trait::async_trait]
impl NsLinks for FakeNs {
    async fn links(&self) -> Result<Vec<Link>, GuestNetError> {
        let k = self.kernel.0.lock().unwrap();
        Ok(k.namespaces[&self.path]
            .iter()
            .map(|l| l.link.clone())
            .collect())
    }

    async fn watch(&self) -> Result<Box<dyn Changes>, GuestNetError> {
        let rx = self.kernel.0.lock().unwrap().changed.subscribe();
        Ok(Box::new(Watcher(rx)))
    }

    async fn set_up(&self, index: u32, up: bool) -> Result<(), GuestNetError> {
        self.note(format!("set {index} {}", if up { "up" } else { "down" }));
        let was = self.on_link("set up", index, |l| {
            let was = l.link.up;
            l.link.up = up;
            if !up {
                l.link.running = false;
            }
            Ok(was)
        })?;
        self.kernel.after_request();
        if up && !was {
            self.kernel.link_came_up(index);
        }
        Ok(())
    }

    async fn rename(&self, index: u32, name: &str) -> Result<(), GuestNetError> {
        self.note(format!("rename {index} to {name}"));
        let busy = self.kernel.0.lock().unwrap().busy_rename_when_up;
        let taken = self
            .links()
            .await?
            .iter()
            .any(|l| l.name == name && l.index != index);
        let r = self.on_link("rename", index, |l| {
            if busy && l.link.up {
                return Err(err(
                    "rename",
                    format!("{} to {name}", l.link.name),
                    libc::EBUSY,
                ));
            }
            if taken {
                return Err(err(
                    "rename",
                    format!("{} to {name}", l.link.name),
                    libc::EEXIST,
                ));
            }
            l.link.name = name.to_owned();
            Ok(())
        });
        self.kernel.after_request();
        r
    }

    async fn move_to(&self, index: u32, target: &Path, name: &str) -> Result<(), GuestNetError> {
        self.note(format!("move {index} to {} as {name}", target.display()));
        let r = {
            let mut k = self.kernel.0.lock().unwrap();
            if !k.namespaces.contains_key(target) {
                Err(err("move", target.display().to_string(), libc::ENOENT))
            } else if k.namespaces[target].iter().any(|l| l.link.name == name) {
                Err(err("move", name.to_owned(), libc::EEXIST))
            } else {
                let links = k
                    .namespaces
                    .get_mut(&self.path)
                    .expect("a namespace of the fake");
                match links.iter().position(|l| l.link.index == index) {
                    None => Err(err("move", format!("link {index}"), libc::ENODEV)),
                    Some(i) => {
                        let mut l = links.remove(i);
                        // The kernel closes the device, then names it in the target.
                        l.link.up = false;
                        l.link.running = false;
                        l.link.name = name.to_owned();
                        l.addrs.clear();
                        k.namespaces.get_mut(target).expect("checked").push(l);
                        Ok(())
                    }
                }
            }
        };
        self.kernel.after_request();
        r
    }

    async fn set_mtu(&self, index: u32, mtu: u32) -> Result<(), GuestNetError> {
        self.note(format!("mtu {index} {mtu}"));
        self.on_link("set the MTU of", index, |l| {
            l.mtu = mtu;
            Ok(())
        })?;
        self.kernel.after_request();
        Ok(())
    }

    async fn addresses(&self, index: u32) -> Result<Vec<Addr>, GuestNetError> {
        self.on_link("list addresses of", index, |l| Ok(l.addrs.clone()))
    }

    async fn add_address(&self, index: u32, ip: IpAddr, prefix: u8) -> Result<(), GuestNetError> {
        self.note(format!("address {index} {ip}/{prefix}"));
        let running = self.on_link("add address to", index, |l| {
            if !l.addrs.iter().any(|a| a.ip == ip) {
                l.addrs.push(Addr {
                    ip,
                    prefix,
                    tentative: ip.is_ipv6(),
                    dad_failed: false,
                });
            }
            Ok(l.link.running)
        })?;
        self.kernel.after_request();
        if running {
            let kernel = self.kernel.clone();
            tokio::spawn(async move {
                tokio::time::sleep(SETTLE).await;
                kernel.settle_dad(index);
            });
        }
        Ok(())
    }

    async fn add_route(
        &self,
        index: u32,
        destination: IpAddr,
        prefix: u8,
        via: Option<IpAddr>,
    ) -> Result<(), GuestNetError> {
        self.note(format!(
            "route {index} {}",
            super::route_text(destination, prefix, via)
        ));
        Ok(())
    }

    async fn sysctl(&self, key: &str) -> Result<String, GuestNetError> {
        let k = self.kernel.0.lock().unwrap();
        let path = self.path.clone();
        // A device's neighbour setting starts from the namespace's default.
        let lookup = |key: &str| k.sysctls.get(&(path.clone(), key.to_owned())).cloned();
        lookup(key)
            .or_else(|| {
                key.strip_prefix("ipv6/neigh/")
                    .and_then(|rest| rest.split_once('/'))
                    .and_then(|(_, leaf)| lookup(&format!("ipv6/neigh/default/{leaf}")))
            })
            .ok_or_else(|| GuestNetError::Sysctl {
                key: key.to_owned(),
                error: std::io::ErrorKind::NotFound.into(),
            })
    }

    async fn set_sysctl(&self, key: &str, value: &str) -> Result<(), GuestNetError> {
        self.note(format!("sysctl {key}={value}"));
        self.kernel
            .0
            .lock()
            .unwrap()
            .sysctls
            .insert((self.path.clone(), key.to_owned()), value.to_owned());
        Ok(())
    }

    async fn announce(&self, index: u32, _mac: [u8; 6], ip: IpAddr) -> Result<(), GuestNetError> {
        let usable = self.on_link("announce", index, |l| {
            Ok(l.link.running
                && l.addrs
                    .iter()
                    .any(|a| a.ip == ip && !a.tentative && !a.dad_failed))
        })?;
        self.kernel
            .0
            .lock()
            .unwrap()
            .announced
            .push((self.path.clone(), ip, usable));
        Ok(())
    }
}
