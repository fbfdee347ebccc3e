//! A container's cgroup: its statistics (the `Stats` call) and its OOM events.
//!
//! The cgroup is found from `/proc/<init pid>/cgroup` right after `runc
//! create`, so it is right whatever cgroup driver or path containerd chose.
//! Both layouts are served:
//!
//! - cgroup v2 (unified `/sys/fs/cgroup`): statistics from `cpu.stat`,
//!   `memory.{current,max,stat,events,swap.*}`, `pids.*`, `io.stat`, returned
//!   as `io.containerd.cgroups.v2.Metrics`; an OOM kill is an increase of
//!   `oom_kill` in `memory.events`, watched with inotify.
//! - cgroup v1 (and the hybrid layout): statistics from the `cpu`,
//!   `cpuacct`, `memory` and `pids` controllers, returned as
//!   `io.containerd.cgroups.v1.Metrics`; OOM is watched with an eventfd
//!   registered on `memory.oom_control` through `cgroup.event_control`.
//!
//! The files are small kernel-generated ones; they are read in place (the
//! reads do not block on I/O).

use std::{
    collections::HashMap,
    fs, io,
    os::fd::{AsFd, AsRawFd, OwnedFd},
    path::{Path, PathBuf},
};

use containerd_shim_protos::{
    cgroups::metrics as v1,
    cgroups_v2::metrics as v2,
    protobuf::{well_known_types::any::Any, Message, MessageField},
};
use log::debug;
use tokio::io::unix::AsyncFd;

/// Type URL of cgroup v1 metrics.
pub const V1_METRICS_TYPE: &str = "io.containerd.cgroups.v1.Metrics";
/// Type URL of cgroup v2 metrics.
pub const V2_METRICS_TYPE: &str = "io.containerd.cgroups.v2.Metrics";

/// Where a container's cgroup is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cgroup {
    /// Unified hierarchy: one directory.
    V2(PathBuf),
    /// Per-controller directories (those that were found).
    V1(HashMap<String, PathBuf>),
}

/// Whether `/sys/fs/cgroup` is the unified hierarchy.
pub fn is_unified() -> bool {
    nix::sys::statfs::statfs("/sys/fs/cgroup")
        .map(|s| s.filesystem_type() == nix::sys::statfs::CGROUP2_SUPER_MAGIC)
        .unwrap_or(false)
}

impl Cgroup {
    /// The cgroup of process `pid`.
    pub fn of_pid(pid: u32) -> io::Result<Self> {
        let content = fs::read_to_string(format!("/proc/{pid}/cgroup"))?;
        if is_unified() {
            let rel = parse_v2_line(&content)
                .ok_or_else(|| io::Error::other("no unified entry in /proc/PID/cgroup"))?;
            return Ok(Self::V2(
                Path::new("/sys/fs/cgroup").join(rel.trim_start_matches('/')),
            ));
        }
        let mounts = fs::read_to_string("/proc/self/mountinfo")?;
        let roots = v1_mount_points(&mounts);
        let mut paths = HashMap::new();
        for (controllers, rel) in parse_v1_lines(&content) {
            for c in controllers.split(',') {
                if let Some(mount) = roots.get(c) {
                    paths.insert(c.to_owned(), mount.join(rel.trim_start_matches('/')));
                }
            }
        }
        Ok(Self::V1(paths))
    }

    /// The container's statistics as containerd expects them.
    pub fn metrics(&self) -> io::Result<Any> {
        let (type_url, value) = match self {
            Self::V2(dir) => (V2_METRICS_TYPE, v2_metrics(dir).write_to_bytes()),
            Self::V1(paths) => (V1_METRICS_TYPE, v1_metrics(paths).write_to_bytes()),
        };
        Ok(Any {
            type_url: type_url.to_owned(),
            value: value.map_err(io::Error::other)?,
            ..Default::default()
        })
    }

    /// Starts watching for OOM kills; `None` when there is no memory controller.
    pub fn oom_watcher(&self) -> io::Result<Option<OomWatcher>> {
        match self {
            Self::V2(dir) => OomWatcher::v2(dir).map(Some),
            Self::V1(paths) => match paths.get("memory") {
                Some(dir) => OomWatcher::v1(dir).map(Some),
                None => Ok(None),
            },
        }
    }
}

fn parse_v2_line(content: &str) -> Option<&str> {
    content.lines().find_map(|l| l.strip_prefix("0::"))
}

/// `(controllers, path)` of the v1 lines of `/proc/PID/cgroup`.
fn parse_v1_lines(content: &str) -> Vec<(&str, &str)> {
    content
        .lines()
        .filter_map(|l| {
            let mut it = l.splitn(3, ':');
            let _id = it.next()?;
            let controllers = it.next()?;
            let path = it.next()?;
            (!controllers.is_empty()).then_some((controllers, path))
        })
        .collect()
}

/// Controller name to mount point, from `/proc/self/mountinfo`.
fn v1_mount_points(mountinfo: &str) -> HashMap<String, PathBuf> {
    let mut out = HashMap::new();
    for line in mountinfo.lines() {
        // id parent major:minor root mountpoint options [optional...] - fstype source superopts
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let mut r = right.split(' ');
        if r.next() != Some("cgroup") {
            continue;
        }
        let _source = r.next();
        let superopts = r.next().unwrap_or_default();
        let Some(mount_point) = left.split(' ').nth(4) else {
            continue;
        };
        for opt in superopts.split(',') {
            let name = opt.strip_prefix("name=").unwrap_or(opt);
            if matches!(
                name,
                "cpu" | "cpuacct" | "memory" | "pids" | "blkio" | "cpuset" | "hugetlb" | "systemd"
            ) {
                out.entry(name.to_owned())
                    .or_insert_with(|| PathBuf::from(unescape_mount(mount_point)));
            }
        }
    }
    out
}

fn unescape_mount(s: &str) -> String {
    s.replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\012", "\n")
        .replace("\\134", "\\")
}

fn read_u64(path: &Path) -> Option<u64> {
    let s = fs::read_to_string(path).ok()?;
    let s = s.trim();
    if s == "max" {
        return Some(u64::MAX);
    }
    s.parse().ok()
}

/// `key value` lines.
fn read_flat(path: &Path) -> HashMap<String, u64> {
    fs::read_to_string(path)
        .map(|s| parse_flat(&s))
        .unwrap_or_default()
}

fn parse_flat(s: &str) -> HashMap<String, u64> {
    s.lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            let k = it.next()?;
            let v = it.next()?.parse().ok()?;
            Some((k.to_owned(), v))
        })
        .collect()
}

fn v2_metrics(dir: &Path) -> v2::Metrics {
    let mut m = v2::Metrics::new();
    let get = |map: &HashMap<String, u64>, k: &str| map.get(k).copied().unwrap_or(0);

    if dir.join("pids.current").exists() {
        m.pids = MessageField::some(v2::PidsStat {
            current: read_u64(&dir.join("pids.current")).unwrap_or(0),
            limit: match read_u64(&dir.join("pids.max")) {
                Some(u64::MAX) | None => 0,
                Some(v) => v,
            },
            ..Default::default()
        });
    }

    let cpu = read_flat(&dir.join("cpu.stat"));
    m.cpu = MessageField::some(v2::CPUStat {
        usage_usec: get(&cpu, "usage_usec"),
        user_usec: get(&cpu, "user_usec"),
        system_usec: get(&cpu, "system_usec"),
        nr_periods: get(&cpu, "nr_periods"),
        nr_throttled: get(&cpu, "nr_throttled"),
        throttled_usec: get(&cpu, "throttled_usec"),
        ..Default::default()
    });

    if dir.join("memory.current").exists() {
        let s = read_flat(&dir.join("memory.stat"));
        let limit = |f: &str| read_u64(&dir.join(f)).unwrap_or_default();
        m.memory = MessageField::some(v2::MemoryStat {
            anon: get(&s, "anon"),
            file: get(&s, "file"),
            kernel_stack: get(&s, "kernel_stack"),
            slab: get(&s, "slab"),
            sock: get(&s, "sock"),
            shmem: get(&s, "shmem"),
            file_mapped: get(&s, "file_mapped"),
            file_dirty: get(&s, "file_dirty"),
            file_writeback: get(&s, "file_writeback"),
            anon_thp: get(&s, "anon_thp"),
            inactive_anon: get(&s, "inactive_anon"),
            active_anon: get(&s, "active_anon"),
            inactive_file: get(&s, "inactive_file"),
            active_file: get(&s, "active_file"),
            unevictable: get(&s, "unevictable"),
            slab_reclaimable: get(&s, "slab_reclaimable"),
            slab_unreclaimable: get(&s, "slab_unreclaimable"),
            pgfault: get(&s, "pgfault"),
            pgmajfault: get(&s, "pgmajfault"),
            workingset_refault: get(&s, "workingset_refault")
                + get(&s, "workingset_refault_anon")
                + get(&s, "workingset_refault_file"),
            workingset_activate: get(&s, "workingset_activate")
                + get(&s, "workingset_activate_anon")
                + get(&s, "workingset_activate_file"),
            workingset_nodereclaim: get(&s, "workingset_nodereclaim"),
            pgrefill: get(&s, "pgrefill"),
            pgscan: get(&s, "pgscan"),
            pgsteal: get(&s, "pgsteal"),
            pgactivate: get(&s, "pgactivate"),
            pgdeactivate: get(&s, "pgdeactivate"),
            pglazyfree: get(&s, "pglazyfree"),
            pglazyfreed: get(&s, "pglazyfreed"),
            thp_fault_alloc: get(&s, "thp_fault_alloc"),
            thp_collapse_alloc: get(&s, "thp_collapse_alloc"),
            usage: read_u64(&dir.join("memory.current")).unwrap_or(0),
            usage_limit: limit("memory.max"),
            swap_usage: read_u64(&dir.join("memory.swap.current")).unwrap_or(0),
            swap_limit: limit("memory.swap.max"),
            max_usage: read_u64(&dir.join("memory.peak")).unwrap_or(0),
            ..Default::default()
        });
        let e = read_flat(&dir.join("memory.events"));
        m.memory_events = MessageField::some(v2::MemoryEvents {
            low: get(&e, "low"),
            high: get(&e, "high"),
            max: get(&e, "max"),
            oom: get(&e, "oom"),
            oom_kill: get(&e, "oom_kill"),
            oom_group_kill: get(&e, "oom_group_kill"),
            ..Default::default()
        });
    }

    if let Ok(io_stat) = fs::read_to_string(dir.join("io.stat")) {
        let mut io = v2::IOStat::new();
        for line in io_stat.lines() {
            let mut it = line.split_whitespace();
            let Some((major, minor)) = it.next().and_then(|d| d.split_once(':')) else {
                continue;
            };
            let mut e = v2::IOEntry {
                major: major.parse().unwrap_or(0),
                minor: minor.parse().unwrap_or(0),
                ..Default::default()
            };
            for kv in it {
                if let Some((k, v)) = kv.split_once('=') {
                    let v = v.parse().unwrap_or(0);
                    match k {
                        "rbytes" => e.rbytes = v,
                        "wbytes" => e.wbytes = v,
                        "rios" => e.rios = v,
                        "wios" => e.wios = v,
                        _ => {}
                    }
                }
            }
            io.usage.push(e);
        }
        m.io = MessageField::some(io);
    }
    m
}

fn v1_metrics(paths: &HashMap<String, PathBuf>) -> v1::Metrics {
    let mut m = v1::Metrics::new();

    if let Some(dir) = paths.get("pids") {
        m.pids = MessageField::some(v1::PidsStat {
            current: read_u64(&dir.join("pids.current")).unwrap_or(0),
            limit: match read_u64(&dir.join("pids.max")) {
                Some(u64::MAX) | None => 0,
                Some(v) => v,
            },
            ..Default::default()
        });
    }

    let mut cpu = v1::CPUStat::new();
    if let Some(dir) = paths.get("cpuacct") {
        // cpuacct.stat is in USER_HZ ticks; containerd reports nanoseconds.
        let ticks = read_flat(&dir.join("cpuacct.stat"));
        let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
            .ok()
            .flatten()
            .filter(|v| *v > 0)
            .unwrap_or(100) as u64;
        let ns = |t: u64| t.saturating_mul(1_000_000_000 / hz);
        cpu.usage = MessageField::some(v1::CPUUsage {
            total: read_u64(&dir.join("cpuacct.usage")).unwrap_or(0),
            kernel: ns(ticks.get("system").copied().unwrap_or(0)),
            user: ns(ticks.get("user").copied().unwrap_or(0)),
            per_cpu: fs::read_to_string(dir.join("cpuacct.usage_percpu"))
                .map(|s| {
                    s.split_whitespace()
                        .filter_map(|v| v.parse().ok())
                        .collect()
                })
                .unwrap_or_default(),
            ..Default::default()
        });
    }
    if let Some(dir) = paths.get("cpu") {
        let s = read_flat(&dir.join("cpu.stat"));
        cpu.throttling = MessageField::some(v1::Throttle {
            periods: s.get("nr_periods").copied().unwrap_or(0),
            throttled_periods: s.get("nr_throttled").copied().unwrap_or(0),
            throttled_time: s.get("throttled_time").copied().unwrap_or(0),
            ..Default::default()
        });
    }
    m.cpu = MessageField::some(cpu);

    if let Some(dir) = paths.get("memory") {
        let s = read_flat(&dir.join("memory.stat"));
        let g = |k: &str| s.get(k).copied().unwrap_or(0);
        let entry = |prefix: &str| {
            let f = |name: &str| read_u64(&dir.join(format!("{prefix}.{name}"))).unwrap_or(0);
            MessageField::some(v1::MemoryEntry {
                usage: f("usage_in_bytes"),
                limit: f("limit_in_bytes"),
                max: f("max_usage_in_bytes"),
                failcnt: f("failcnt"),
                ..Default::default()
            })
        };
        m.memory = MessageField::some(v1::MemoryStat {
            cache: g("cache"),
            rss: g("rss"),
            rss_huge: g("rss_huge"),
            mapped_file: g("mapped_file"),
            dirty: g("dirty"),
            writeback: g("writeback"),
            pg_pg_in: g("pgpgin"),
            pg_pg_out: g("pgpgout"),
            pg_fault: g("pgfault"),
            pg_maj_fault: g("pgmajfault"),
            inactive_anon: g("inactive_anon"),
            active_anon: g("active_anon"),
            inactive_file: g("inactive_file"),
            active_file: g("active_file"),
            unevictable: g("unevictable"),
            hierarchical_memory_limit: g("hierarchical_memory_limit"),
            hierarchical_swap_limit: g("hierarchical_memsw_limit"),
            total_cache: g("total_cache"),
            total_rss: g("total_rss"),
            total_rss_huge: g("total_rss_huge"),
            total_mapped_file: g("total_mapped_file"),
            total_dirty: g("total_dirty"),
            total_writeback: g("total_writeback"),
            total_pg_pg_in: g("total_pgpgin"),
            total_pg_pg_out: g("total_pgpgout"),
            total_pg_fault: g("total_pgfault"),
            total_pg_maj_fault: g("total_pgmajfault"),
            total_inactive_anon: g("total_inactive_anon"),
            total_active_anon: g("total_active_anon"),
            total_inactive_file: g("total_inactive_file"),
            total_active_file: g("total_active_file"),
            total_unevictable: g("total_unevictable"),
            usage: entry("memory"),
            swap: entry("memory.memsw"),
            kernel: entry("memory.kmem"),
            kernel_tcp: entry("memory.kmem.tcp"),
            ..Default::default()
        });
        let oom = read_flat(&dir.join("memory.oom_control"));
        m.memory_oom_control = MessageField::some(v1::MemoryOomControl {
            oom_kill_disable: oom.get("oom_kill_disable").copied().unwrap_or(0),
            under_oom: oom.get("under_oom").copied().unwrap_or(0),
            oom_kill: oom.get("oom_kill").copied().unwrap_or(0),
            ..Default::default()
        });
    }
    m
}

/// Waits for OOM kills in one cgroup.
pub struct OomWatcher {
    kind: OomKind,
}

enum OomKind {
    /// v2: inotify on memory.events, and the last `oom_kill` count seen.
    V2 {
        inotify: AsyncFd<OwnedFd>,
        events: PathBuf,
        seen: u64,
    },
    /// v1: an eventfd signalled on each OOM (and when the cgroup goes away).
    V1 {
        eventfd: AsyncFd<OwnedFd>,
        oom_control: PathBuf,
    },
}

impl OomWatcher {
    fn v2(dir: &Path) -> io::Result<Self> {
        use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
        let events = dir.join("memory.events");
        let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)?;
        inotify.add_watch(&events, AddWatchFlags::IN_MODIFY)?;
        let seen = read_flat(&events).get("oom_kill").copied().unwrap_or(0);
        Ok(Self {
            kind: OomKind::V2 {
                inotify: crate::stdio::register(OwnedFd::from(inotify))?,
                events,
                seen,
            },
        })
    }

    fn v1(dir: &Path) -> io::Result<Self> {
        use nix::sys::eventfd::{EfdFlags, EventFd};
        let oom_control = dir.join("memory.oom_control");
        let control = fs::File::open(&oom_control)?;
        let efd = EventFd::from_value_and_flags(0, EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)?;
        let efd = OwnedFd::from(efd);
        fs::write(
            dir.join("cgroup.event_control"),
            format!("{} {}", efd.as_raw_fd(), control.as_raw_fd()),
        )?;
        Ok(Self {
            kind: OomKind::V1 {
                eventfd: crate::stdio::register(efd)?,
                oom_control,
            },
        })
    }

    /// Waits for the next OOM kill; `None` once the cgroup is gone.
    pub async fn next(&mut self) -> Option<()> {
        loop {
            match &mut self.kind {
                OomKind::V2 {
                    inotify,
                    events,
                    seen,
                } => {
                    let mut guard = inotify.readable().await.ok()?;
                    // Drain the inotify events; only the counter matters.
                    let mut buf = [0u8; 1024];
                    match guard.try_io(|fd| {
                        nix::unistd::read(fd.get_ref().as_fd(), &mut buf).map_err(io::Error::from)
                    }) {
                        Ok(Ok(_)) => {}
                        Ok(Err(e)) => {
                            debug!("inotify on {}: {e}", events.display());
                            return None;
                        }
                        Err(_would_block) => continue,
                    }
                    let now = match fs::read_to_string(&*events) {
                        Ok(s) => parse_flat(&s).get("oom_kill").copied().unwrap_or(0),
                        Err(_) => return None,
                    };
                    if now > *seen {
                        *seen = now;
                        return Some(());
                    }
                }
                OomKind::V1 {
                    eventfd,
                    oom_control,
                } => {
                    let mut guard = eventfd.readable().await.ok()?;
                    let mut buf = [0u8; 8];
                    match guard.try_io(|fd| {
                        nix::unistd::read(fd.get_ref().as_fd(), &mut buf).map_err(io::Error::from)
                    }) {
                        Ok(Ok(_)) => {}
                        Ok(Err(_)) => return None,
                        Err(_would_block) => continue,
                    }
                    // The eventfd also fires when the cgroup is removed.
                    if !oom_control.exists() {
                        return None;
                    }
                    return Some(());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_cgroup_lines() {
        let c =
            "12:pids:/default/c1\n4:cpu,cpuacct:/default/c1\n1:name=systemd:/default/c1\n0::/\n";
        assert_eq!(
            parse_v1_lines(c),
            vec![
                ("pids", "/default/c1"),
                ("cpu,cpuacct", "/default/c1"),
                ("name=systemd", "/default/c1")
            ]
        );
        assert_eq!(parse_v2_line(c), Some("/"));
        assert_eq!(parse_v2_line("0::/k8s/pod1/c\n"), Some("/k8s/pod1/c"));
    }

    #[test]
    fn mountinfo() {
        let m = "30 25 0:26 / /sys/fs/cgroup/memory rw,relatime shared:10 - cgroup cgroup rw,memory\n\
                 31 25 0:27 / /sys/fs/cgroup/cpu,cpuacct rw,relatime shared:11 - cgroup cgroup rw,cpu,cpuacct\n\
                 32 25 0:28 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n\
                 33 25 0:29 / /proc rw - proc proc rw\n";
        let r = v1_mount_points(m);
        assert_eq!(r.get("memory").unwrap(), Path::new("/sys/fs/cgroup/memory"));
        assert_eq!(
            r.get("cpu").unwrap(),
            Path::new("/sys/fs/cgroup/cpu,cpuacct")
        );
        assert_eq!(
            r.get("cpuacct").unwrap(),
            Path::new("/sys/fs/cgroup/cpu,cpuacct")
        );
        assert!(!r.contains_key("unified"));
    }

    #[test]
    fn v2_from_files() {
        let d = tempfile::tempdir().unwrap();
        let w = |f: &str, s: &str| fs::write(d.path().join(f), s).unwrap();
        w("pids.current", "3\n");
        w("pids.max", "max\n");
        w("cpu.stat", "usage_usec 100\nuser_usec 60\nsystem_usec 40\n");
        w("memory.current", "4096\n");
        w("memory.max", "8192\n");
        w("memory.stat", "anon 1\nfile 2\n");
        w("memory.events", "low 0\nhigh 0\nmax 1\noom 1\noom_kill 1\n");
        w(
            "io.stat",
            "8:0 rbytes=10 wbytes=20 rios=1 wios=2 dbytes=0 dios=0\n",
        );
        let m = v2_metrics(d.path());
        assert_eq!(m.pids.current, 3);
        assert_eq!(m.pids.limit, 0);
        assert_eq!(m.cpu.usage_usec, 100);
        assert_eq!(m.memory.usage, 4096);
        assert_eq!(m.memory.usage_limit, 8192);
        assert_eq!(m.memory.file, 2);
        assert_eq!(m.memory_events.oom_kill, 1);
        assert_eq!(m.io.usage[0].wbytes, 20);
        let any = Cgroup::V2(d.path().into()).metrics().unwrap();
        assert_eq!(any.type_url, V2_METRICS_TYPE);
    }

    #[test]
    fn v1_from_files() {
        let d = tempfile::tempdir().unwrap();
        let w = |f: &str, s: &str| fs::write(d.path().join(f), s).unwrap();
        w("memory.stat", "cache 5\nrss 7\ntotal_rss 9\n");
        w("memory.usage_in_bytes", "4096\n");
        w("memory.limit_in_bytes", "9223372036854771712\n");
        w("cpuacct.usage", "123456\n");
        w("cpuacct.stat", "user 2\nsystem 1\n");
        w("cpuacct.usage_percpu", "100 200 \n");
        w("pids.current", "2\n");
        w("pids.max", "50\n");
        let p: HashMap<String, PathBuf> = ["memory", "cpuacct", "pids"]
            .iter()
            .map(|c| (c.to_string(), d.path().to_owned()))
            .collect();
        let m = v1_metrics(&p);
        assert_eq!(m.memory.rss, 7);
        assert_eq!(m.memory.total_rss, 9);
        assert_eq!(m.memory.usage.usage, 4096);
        assert_eq!(m.cpu.usage.total, 123456);
        assert_eq!(m.cpu.usage.per_cpu, vec![100, 200]);
        assert!(m.cpu.usage.user > 0);
        assert_eq!(m.pids.limit, 50);
    }
}
