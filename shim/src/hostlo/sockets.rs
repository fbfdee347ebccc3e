//! Sockets in the pod's network namespace, made by a thread that lives there.
//!
//! A socket belongs to the namespace of the thread that created it, so the
//! relays (which run on the shim's tokio runtime, in the VM's namespace) ask a
//! dedicated thread, which entered the pod namespace once, to create their
//! sockets, then use them from tokio. The same thread reads the pod's socket
//! tables (`/proc/thread-self/net/*` follow the thread's namespace).

use std::{
    net::SocketAddr,
    os::fd::AsFd,
    path::{Path, PathBuf},
    sync::mpsc,
};

use tokio::sync::oneshot;

type Job = Box<dyn FnOnce() + Send>;

/// The socket maker of one pod namespace. Dropping it ends the thread.
pub struct NetnsSockets {
    jobs: mpsc::Sender<Job>,
    netns: PathBuf,
}

impl NetnsSockets {
    /// Starts the thread in the namespace at `netns`.
    pub fn open(netns: &Path) -> std::io::Result<NetnsSockets> {
        let ns = std::fs::File::open(netns)?;
        let (jobs, rx) = mpsc::channel::<Job>();
        let (ready_tx, ready_rx) = mpsc::channel();
        std::thread::Builder::new()
            .name("hostlo-netns".into())
            .spawn(move || {
                let entered = nix::sched::setns(ns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
                    .map_err(std::io::Error::from);
                let ok = entered.is_ok();
                let _ = ready_tx.send(entered);
                if ok {
                    while let Ok(job) = rx.recv() {
                        job();
                    }
                }
            })?;
        ready_rx
            .recv()
            .map_err(|_| std::io::Error::other("netns thread died"))??;
        Ok(NetnsSockets {
            jobs,
            netns: netns.to_path_buf(),
        })
    }

    /// The namespace.
    pub fn netns(&self) -> &Path {
        &self.netns
    }

    /// Runs `f` on the namespace's thread.
    pub async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> std::io::Result<T> {
        let (tx, rx) = oneshot::channel();
        self.jobs
            .send(Box::new(move || {
                let _ = tx.send(f());
            }))
            .map_err(|_| std::io::Error::other("netns thread gone"))?;
        rx.await
            .map_err(|_| std::io::Error::other("netns thread gone"))
    }

    /// A TCP listener on `addr`.
    pub async fn tcp_listener(&self, addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
        let std = self
            .run(move || {
                let s = socket2::Socket::new(
                    socket2::Domain::for_address(addr),
                    socket2::Type::STREAM,
                    None,
                )?;
                s.set_reuse_address(true)?;
                s.set_nonblocking(true)?;
                s.bind(&addr.into())?;
                s.listen(1024)?;
                Ok::<_, std::io::Error>(std::net::TcpListener::from(s))
            })
            .await??;
        tokio::net::TcpListener::from_std(std)
    }

    /// A TCP connection to `addr`, from the namespace.
    pub async fn tcp_connect(&self, addr: SocketAddr) -> std::io::Result<tokio::net::TcpStream> {
        let std = self
            .run(move || {
                let s = socket2::Socket::new(
                    socket2::Domain::for_address(addr),
                    socket2::Type::STREAM,
                    None,
                )?;
                s.set_nonblocking(true)?;
                Ok::<_, std::io::Error>(std::net::TcpStream::from(s))
            })
            .await??;
        let stream = tokio::net::TcpSocket::from_std_stream(std)
            .connect(addr)
            .await?;
        stream.set_nodelay(true)?;
        Ok(stream)
    }

    /// A UDP socket bound to `addr`.
    pub async fn udp_bind(&self, addr: SocketAddr) -> std::io::Result<tokio::net::UdpSocket> {
        let std = self
            .run(move || {
                let s = socket2::Socket::new(
                    socket2::Domain::for_address(addr),
                    socket2::Type::DGRAM,
                    None,
                )?;
                s.set_reuse_address(true)?;
                s.set_nonblocking(true)?;
                s.bind(&addr.into())?;
                Ok::<_, std::io::Error>(std::net::UdpSocket::from(s))
            })
            .await??;
        tokio::net::UdpSocket::from_std(std)
    }

    /// Reads a file of the namespace's `/proc/thread-self/net/`.
    pub async fn proc_net(&self, file: &'static str) -> std::io::Result<String> {
        self.run(move || std::fs::read_to_string(format!("/proc/thread-self/net/{file}")))
            .await?
    }
}
