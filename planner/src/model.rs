//! Domain types: resources, VM types, the catalogue, pods and clients, the host model,
//! placements and their validation.
//!
//! Quantities are integers so that fit tests are exact: CPU in milli-vCPU, memory in MiB,
//! prices in micro-dollars per hour.
use std::collections::BTreeMap;
use std::fmt;

use serde::Serialize;

use super::error::Violation;

/// Largest CPU quantity accepted anywhere (a request, a VM type, a host), in vCPU. The
/// largest instance of the AWS list has 448 vCPU; a million is "absurd", and keeps every
/// sum of up to 10^9 quantities far inside `u64` (in milli-vCPU).
pub const MAX_VCPU: f64 = 1e6;
/// Largest memory quantity accepted anywhere, in GiB (the largest AWS instance has 24 TiB).
pub const MAX_GIB: f64 = 1e6;
/// Largest price accepted, in $/h.
pub const MAX_PRICE: f64 = 1e6;

/// A CPU and memory quantity: a request, a load or a capacity.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct Res {
    /// CPU in milli-vCPU (1000 = one vCPU).
    pub cpu: u64,
    /// Memory in MiB.
    pub mem: u64,
}

impl Res {
    /// A quantity from milli-vCPU and MiB.
    pub const fn new(cpu: u64, mem: u64) -> Self {
        Self { cpu, mem }
    }

    /// A quantity from vCPU and GiB, rounded up to the unit.
    pub fn from_vcpu_gib(vcpu: f64, gib: f64) -> Self {
        Self {
            cpu: round_up(vcpu * 1000.0),
            mem: round_up(gib * 1024.0),
        }
    }

    /// Whether `self` fits within `cap` in both dimensions.
    pub fn fits_in(self, cap: Res) -> bool {
        self.cpu <= cap.cpu && self.mem <= cap.mem
    }

    /// Component-wise sum (saturating: a saturated load fits no capacity, so an overflow
    /// can only make a packing infeasible, never wrongly feasible).
    pub fn plus(self, o: Res) -> Res {
        Res::new(
            self.cpu.saturating_add(o.cpu),
            self.mem.saturating_add(o.mem),
        )
    }

    /// Component-wise saturating difference.
    pub fn saturating_sub(self, o: Res) -> Res {
        Res::new(
            self.cpu.saturating_sub(o.cpu),
            self.mem.saturating_sub(o.mem),
        )
    }

    /// Component-wise maximum.
    pub fn max(self, o: Res) -> Res {
        Res::new(self.cpu.max(o.cpu), self.mem.max(o.mem))
    }

    /// vCPU as a float.
    pub fn vcpu(self) -> f64 {
        self.cpu as f64 / 1000.0
    }

    /// GiB as a float.
    pub fn gib(self) -> f64 {
        self.mem as f64 / 1024.0
    }

    /// The larger of the two shares of `self` in `cap` (0 when `cap` is zero in a dimension
    /// where `self` is zero too).
    pub fn dominant_share(self, cap: Res) -> f64 {
        let s = |x: u64, c: u64| if c == 0 { 0.0 } else { x as f64 / c as f64 };
        s(self.cpu, cap.cpu).max(s(self.mem, cap.mem))
    }
}

impl fmt::Display for Res {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:.3} vCPU / {:.3} GiB", self.vcpu(), self.gib())
    }
}

/// Rounds a non-negative float up to an integer, ignoring float noise below 1e-6.
pub(crate) fn round_up(x: f64) -> u64 {
    let r = x.round();
    if (x - r).abs() < 1e-6 {
        r as u64
    } else {
        x.ceil() as u64
    }
}

/// Micro-dollars per hour to dollars per hour.
pub fn usd(micro: u64) -> f64 {
    micro as f64 / 1e6
}

/// One VM type of the catalogue.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct VmType {
    /// Instance name (`m5.large`).
    pub name: String,
    /// Family (`m5`); on a per-family host only one family runs.
    pub family: String,
    /// Capacity.
    pub cap: Res,
    /// On-demand price in micro-dollars per hour.
    pub price: u64,
}

/// The VM types a plan may use, sorted by price (then name), with per-family host sizes.
#[derive(Clone, Debug)]
pub struct Catalogue {
    types: Vec<VmType>,
    families: Vec<String>,
    family_of: Vec<usize>,
    family_host: Vec<Res>,
}

impl Catalogue {
    /// Builds a catalogue. Types with a zero capacity or duplicate names are dropped by the
    /// caller's parser, not here; an empty list gives an empty catalogue.
    pub fn new(mut types: Vec<VmType>) -> Self {
        types.sort_by(|a, b| (a.price, &a.name).cmp(&(b.price, &b.name)));
        let mut families: Vec<String> = types.iter().map(|t| t.family.clone()).collect();
        families.sort();
        families.dedup();
        let family_of: Vec<usize> = types
            .iter()
            .map(|t| families.binary_search(&t.family).expect("family listed"))
            .collect();
        let mut family_host = vec![Res::default(); families.len()];
        for (t, &f) in types.iter().zip(&family_of) {
            family_host[f] = family_host[f].max(t.cap);
        }
        Self {
            types,
            families,
            family_of,
            family_host,
        }
    }

    /// The types, cheapest first.
    pub fn types(&self) -> &[VmType] {
        &self.types
    }

    /// Whether there is no type.
    pub fn is_empty(&self) -> bool {
        self.types.is_empty()
    }

    /// Family names, sorted.
    pub fn families(&self) -> &[String] {
        &self.families
    }

    /// Family index of type `t`.
    pub fn family_of(&self, t: usize) -> usize {
        self.family_of[t]
    }

    /// Host of a family: the component-wise largest type of that family (a dedicated host of
    /// a family carries exactly its largest instance).
    pub fn family_host(&self, f: usize) -> Res {
        self.family_host[f]
    }

    /// Indices of all types (cheapest first).
    pub fn all(&self) -> Vec<usize> {
        (0..self.types.len()).collect()
    }

    /// Indices of the types of family `f` (cheapest first).
    pub fn of_family(&self, f: usize) -> Vec<usize> {
        (0..self.types.len())
            .filter(|&t| self.family_of[t] == f)
            .collect()
    }

    /// Component-wise largest capacity of all types.
    pub fn max_cap(&self) -> Res {
        self.types
            .iter()
            .fold(Res::default(), |acc, t| acc.max(t.cap))
    }

    /// Cheapest type among `allowed` (which must be sorted cheapest first) that holds `load`.
    pub fn cheapest_fitting(&self, load: Res, allowed: &[usize]) -> Option<usize> {
        allowed
            .iter()
            .copied()
            .find(|&t| load.fits_in(self.types[t].cap))
    }
}

/// One container: a name and its request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Container {
    /// Name, unique within its pod.
    pub name: String,
    /// Request.
    pub req: Res,
}

/// A pod: containers that share a network namespace.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Pod {
    /// Name, unique within its client.
    pub name: String,
    /// Its containers (at least one).
    pub containers: Vec<Container>,
}

impl Pod {
    /// Summed request of the containers.
    pub fn demand(&self) -> Res {
        self.containers
            .iter()
            .fold(Res::default(), |acc, c| acc.plus(c.req))
    }
}

/// A cloud client (tenant) and its pods.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Client {
    /// Name.
    pub name: String,
    /// Pods.
    pub pods: Vec<Pod>,
}

impl Client {
    /// Summed request of all containers.
    pub fn demand(&self) -> Res {
        self.pods
            .iter()
            .fold(Res::default(), |acc, p| acc.plus(p.demand()))
    }

    /// Number of containers.
    pub fn container_count(&self) -> usize {
        self.pods.iter().map(|p| p.containers.len()).sum()
    }
}

/// Builds clients from `(client, pod, container, request)` tuples, keeping first-seen
/// order of clients, pods and containers.
pub fn group_clients<I>(rows: I) -> Vec<Client>
where
    I: IntoIterator<Item = (String, String, String, Res)>,
{
    let mut clients: Vec<Client> = Vec::new();
    let mut cidx: BTreeMap<String, (usize, BTreeMap<String, usize>)> = BTreeMap::new();
    for (client, pod, container, req) in rows {
        let (ci, pods) = cidx.entry(client.clone()).or_insert_with(|| {
            clients.push(Client {
                name: client,
                pods: Vec::new(),
            });
            (clients.len() - 1, BTreeMap::new())
        });
        let c = &mut clients[*ci];
        let pi = *pods.entry(pod.clone()).or_insert_with(|| {
            c.pods.push(Pod {
                name: pod,
                containers: Vec::new(),
            });
            c.pods.len() - 1
        });
        c.pods[pi].containers.push(Container {
            name: container,
            req,
        });
    }
    clients
}

/// Where the VMs that hold parts of one Hostlo pod must live.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum HostModel {
    /// A host runs one family and holds at most that family's largest instance (AWS
    /// dedicated-host semantics). VMs linked by a spanning pod share one such host.
    PerFamily,
    /// Hosts of a fixed size that run any mix of families.
    Uniform(Res),
    /// All VMs of a client may share a host (no bound).
    Unlimited,
}

/// Whether pods may span VMs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Mode {
    /// (a): every pod within one VM.
    Whole,
    /// (b): a pod may span VMs of one host (Hostlo).
    Hostlo,
}

/// A container of a client: pod index and container index within the pod.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct ItemRef {
    /// Pod index in [`Client::pods`].
    pub pod: u32,
    /// Container index in [`Pod::containers`].
    pub container: u32,
}

/// One VM of a placement: its type and the containers it holds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Vm {
    /// Index in [`Catalogue::types`].
    pub ty: usize,
    /// Containers placed on it.
    pub items: Vec<ItemRef>,
}

/// A placement of a client's containers on VMs.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Placement {
    /// The VMs.
    pub vms: Vec<Vm>,
}

impl Placement {
    /// Total price in micro-dollars per hour.
    pub fn cost(&self, cat: &Catalogue) -> u64 {
        self.vms.iter().map(|v| cat.types()[v.ty].price).sum()
    }

    /// Groups of VMs that must share a host: connected components of the relation
    /// "hold parts of the same pod". Each group is a sorted list of VM indices.
    pub fn host_groups(&self, pod_count: usize) -> Vec<Vec<usize>> {
        let mut parent: Vec<usize> = (0..self.vms.len()).collect();
        fn find(p: &mut [usize], mut x: usize) -> usize {
            while p[x] != x {
                p[x] = p[p[x]];
                x = p[x];
            }
            x
        }
        let mut first_vm: Vec<Option<usize>> = vec![None; pod_count];
        for (v, vm) in self.vms.iter().enumerate() {
            for it in &vm.items {
                match first_vm[it.pod as usize] {
                    None => first_vm[it.pod as usize] = Some(v),
                    Some(u) => {
                        let (a, b) = (find(&mut parent, u), find(&mut parent, v));
                        if a != b {
                            parent[a] = b;
                        }
                    }
                }
            }
        }
        let mut groups: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
        for v in 0..self.vms.len() {
            let r = find(&mut parent, v);
            groups.entry(r).or_default().push(v);
        }
        groups.into_values().collect()
    }

    /// Pods whose containers are on more than one VM, with the VMs (sorted) holding them.
    pub fn spanning_pods(&self) -> BTreeMap<u32, Vec<usize>> {
        let mut where_: BTreeMap<u32, Vec<usize>> = BTreeMap::new();
        for (v, vm) in self.vms.iter().enumerate() {
            for it in &vm.items {
                let e = where_.entry(it.pod).or_default();
                if e.last() != Some(&v) {
                    e.push(v);
                }
            }
        }
        where_.retain(|_, vms| vms.len() > 1);
        where_
    }
}

/// Checks every constraint of a placement: each container placed once, VM capacities,
/// no spanning pod in [`Mode::Whole`], and in [`Mode::Hostlo`] each host group (VMs linked
/// by spanning pods) fits on one host of `host`.
pub fn validate(
    client: &Client,
    cat: &Catalogue,
    host: HostModel,
    mode: Mode,
    placement: &Placement,
) -> Result<(), Violation> {
    let mut seen: Vec<Vec<usize>> = client
        .pods
        .iter()
        .map(|p| vec![0; p.containers.len()])
        .collect();
    for (v, vm) in placement.vms.iter().enumerate() {
        let mut load = Res::default();
        for it in &vm.items {
            let slot = seen
                .get_mut(it.pod as usize)
                .and_then(|p| p.get_mut(it.container as usize));
            match slot {
                Some(n) => *n += 1,
                None => {
                    return Err(Violation::PlacedTimes {
                        pod: it.pod as usize,
                        container: it.container as usize,
                        times: 1,
                    })
                }
            }
            load = load.plus(client.pods[it.pod as usize].containers[it.container as usize].req);
        }
        let ty = &cat.types()[vm.ty];
        if !load.fits_in(ty.cap) {
            return Err(Violation::OverCapacity {
                vm: v,
                ty: ty.name.clone(),
            });
        }
    }
    for (p, counts) in seen.iter().enumerate() {
        for (c, &n) in counts.iter().enumerate() {
            if n != 1 {
                return Err(Violation::PlacedTimes {
                    pod: p,
                    container: c,
                    times: n,
                });
            }
        }
    }
    let spans = placement.spanning_pods();
    match mode {
        Mode::Whole => {
            if let Some((p, vms)) = spans.iter().next() {
                return Err(Violation::PodSpans {
                    pod: *p as usize,
                    vms: vms.len(),
                });
            }
            // Every VM still needs a host.
            for vm in &placement.vms {
                check_group(cat, host, std::iter::once(vm.ty))?;
            }
        }
        Mode::Hostlo => {
            for group in placement.host_groups(client.pods.len()) {
                check_group(cat, host, group.iter().map(|&v| placement.vms[v].ty))?;
            }
        }
    }
    Ok(())
}

/// Checks that VMs of the given types fit together on one host.
pub(crate) fn check_group(
    cat: &Catalogue,
    host: HostModel,
    types: impl Iterator<Item = usize> + Clone,
) -> Result<(), Violation> {
    let total = types
        .clone()
        .fold(Res::default(), |acc, t| acc.plus(cat.types()[t].cap));
    let over = || Violation::HostOverflow {
        cpu_milli: total.cpu,
        mem_mib: total.mem,
    };
    match host {
        HostModel::Unlimited => Ok(()),
        HostModel::Uniform(h) => {
            if total.fits_in(h) {
                Ok(())
            } else {
                Err(over())
            }
        }
        HostModel::PerFamily => {
            let mut fams: Vec<usize> = types.map(|t| cat.family_of(t)).collect();
            fams.sort();
            fams.dedup();
            if fams.len() > 1 {
                return Err(Violation::MixedFamilies(
                    fams.iter().map(|&f| cat.families()[f].clone()).collect(),
                ));
            }
            if total.fits_in(cat.family_host(fams[0])) {
                Ok(())
            } else {
                Err(over())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cat() -> Catalogue {
        Catalogue::new(vec![
            VmType {
                name: "m.l".into(),
                family: "m".into(),
                cap: Res::new(2000, 8192),
                price: 96_000,
            },
            VmType {
                name: "m.xl".into(),
                family: "m".into(),
                cap: Res::new(4000, 16384),
                price: 192_000,
            },
            VmType {
                name: "c.l".into(),
                family: "c".into(),
                cap: Res::new(2000, 4096),
                price: 85_000,
            },
        ])
    }

    fn client() -> Client {
        group_clients(vec![
            ("u".into(), "p".into(), "0".into(), Res::new(1500, 1000)),
            ("u".into(), "p".into(), "1".into(), Res::new(1500, 1000)),
        ])
        .remove(0)
    }

    #[test]
    fn round_up_ignores_float_noise() {
        assert_eq!(round_up(0.125 * 32.0 * 1000.0), 4000);
        assert_eq!(round_up(4000.2), 4001);
        assert_eq!(Res::from_vcpu_gib(2.0, 8.0), Res::new(2000, 8192));
    }

    #[test]
    fn catalogue_sorted_and_hosts() {
        let c = cat();
        assert_eq!(c.types()[0].name, "c.l");
        assert_eq!(c.families(), ["c", "m"]);
        assert_eq!(c.family_host(1), Res::new(4000, 16384));
        assert_eq!(c.cheapest_fitting(Res::new(2000, 5000), &c.all()), Some(1));
    }

    #[test]
    fn validate_modes() {
        let c = cat();
        let cl = client();
        let split = Placement {
            vms: vec![
                Vm {
                    ty: 1,
                    items: vec![ItemRef {
                        pod: 0,
                        container: 0,
                    }],
                },
                Vm {
                    ty: 1,
                    items: vec![ItemRef {
                        pod: 0,
                        container: 1,
                    }],
                },
            ],
        };
        assert!(matches!(
            validate(&cl, &c, HostModel::Unlimited, Mode::Whole, &split),
            Err(Violation::PodSpans { .. })
        ));
        assert!(validate(&cl, &c, HostModel::Unlimited, Mode::Hostlo, &split).is_ok());
        // Two m.l on an m host of 4 vCPU / 16 GiB: fits.
        assert!(validate(&cl, &c, HostModel::PerFamily, Mode::Hostlo, &split).is_ok());
        let mixed = Placement {
            vms: vec![
                Vm {
                    ty: 0,
                    items: vec![ItemRef {
                        pod: 0,
                        container: 0,
                    }],
                },
                Vm {
                    ty: 1,
                    items: vec![ItemRef {
                        pod: 0,
                        container: 1,
                    }],
                },
            ],
        };
        assert!(matches!(
            validate(&cl, &c, HostModel::PerFamily, Mode::Hostlo, &mixed),
            Err(Violation::MixedFamilies(_))
        ));
        assert!(matches!(
            validate(
                &cl,
                &c,
                HostModel::Uniform(Res::new(3000, 100_000)),
                Mode::Hostlo,
                &split
            ),
            Err(Violation::HostOverflow { .. })
        ));
        let over = Placement {
            vms: vec![Vm {
                ty: 0,
                items: vec![
                    ItemRef {
                        pod: 0,
                        container: 0,
                    },
                    ItemRef {
                        pod: 0,
                        container: 1,
                    },
                ],
            }],
        };
        assert!(matches!(
            validate(&cl, &c, HostModel::Unlimited, Mode::Whole, &over),
            Err(Violation::OverCapacity { .. })
        ));
        let missing = Placement {
            vms: vec![Vm {
                ty: 2,
                items: vec![ItemRef {
                    pod: 0,
                    container: 0,
                }],
            }],
        };
        assert!(matches!(
            validate(&cl, &c, HostModel::Unlimited, Mode::Whole, &missing),
            Err(Violation::PlacedTimes { times: 0, .. })
        ));
    }
}
