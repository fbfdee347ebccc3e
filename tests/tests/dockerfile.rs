//! The Dockerfile, built and run with the Docker under test (`NESTLESS_DOCKER`; tests/run.sh
//! runs it with the newest). No registry is reachable, so its two base images are made
//! from Debian's packages and passed as build arguments:
//!
//! ```text
//!  debootstrap --variant=minbase sid ─▶ tar ─▶ docker import ─▶ BASE_IMAGE
//!  BASE_IMAGE + apt-get install rustc cargo gcc libc6-dev ─▶ RUST_IMAGE
//!  docker build --build-arg RUST_IMAGE --build-arg BASE_IMAGE . ─▶ nestless image
//!  the image: nestless-netagent --check-config on the shipped example;
//!             its static shim, copied out, runs a container under containerd
//! ```
//!
//! The debootstrapped root is cached (`$NESTLESS_VERSIONS_DIR/images/`, one per day, since
//! sid moves). Run as root; nothing skips.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use nestless_tests::{
    containerd::{random_name, require_tool, run, Containerd, Options, BUSYBOX_IMAGE},
    docker::Docker,
    netenv::require_root,
};

const BUILD_TIMEOUT: Duration = Duration::from_secs(40 * 60);

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A sid minbase root as a tarball, debootstrapped once a day.
fn sid_rootfs() -> PathBuf {
    require_tool("debootstrap", "debootstrap");
    let dir = PathBuf::from(
        std::env::var("NESTLESS_VERSIONS_DIR").unwrap_or("/var/cache/nestless/versions".into()),
    )
    .join("images");
    std::fs::create_dir_all(&dir).expect("the image cache");
    let day = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
        / 86_400;
    let tar = dir.join(format!("sid-minbase-{day}-v2.tar"));
    if tar.is_file() {
        return tar;
    }
    let root = dir.join(random_name("root"));
    let mut c = Command::new("debootstrap");
    c.args(["--variant=minbase", "sid"])
        .arg(&root)
        .arg("http://deb.debian.org/debian");
    let r = run(c, None, BUILD_TIMEOUT);
    assert_eq!(
        r.code, 0,
        "debootstrap of sid failed:\n{}\n{}",
        r.stdout, r.stderr
    );
    // The machine's apt setting on Release files' Valid-Until (its archive mirror may serve
    // them past it, which the machine's own apt is told to accept), so that the image's apt,
    // in the Rust base and in the Dockerfile's runtime stage, reaches the same mirror.
    let valid_until: String = std::fs::read_dir("/etc/apt/apt.conf.d")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| std::fs::read_to_string(e.path()).ok())
        .flat_map(|t| {
            t.lines()
                .filter(|l| l.contains("Check-Valid-Until"))
                .map(|l| format!("{l}\n"))
                .collect::<Vec<_>>()
        })
        .collect();
    std::fs::write(
        root.join("etc/apt/apt.conf.d/99host-valid-until"),
        valid_until,
    )
    .expect("the image's apt setting");
    let part = tar.with_extension("part");
    let mut c = Command::new("tar");
    c.arg("-C").arg(&root).arg("-cf").arg(&part).arg(".");
    run(c, None, BUILD_TIMEOUT).ok();
    let _ = std::fs::remove_dir_all(&root);
    std::fs::rename(&part, &tar).expect("the rootfs tarball");
    tar
}

#[test]
#[ignore = "opt-in (cargo test --test dockerfile -- --ignored): its release build inside \
            Docker took over 30 min on the 2-core CI machine, past CI's budget (issue 12)"]
fn the_dockerfile_builds_and_its_image_runs() {
    require_root();
    let d = Docker::start(
        Containerd::start(Options::default()),
        Path::new("/dev/null"),
    );
    eprintln!("[dockerfile] {}", d.version);
    let tar = sid_rootfs();
    d.docker_ok(&["import", &tar.to_string_lossy(), "nestless-test/debian:sid"]);
    // The Rust base: Debian's rustc and cargo, and the machine's own certificate
    // authorities (its way out to crates.io may be a TLS-inspecting proxy).
    let ctx = d.dir().join("rust-image");
    std::fs::create_dir_all(ctx.join("ca")).unwrap();
    for e in std::fs::read_dir("/usr/local/share/ca-certificates")
        .into_iter()
        .flatten()
        .flatten()
    {
        if e.path().extension().is_some_and(|x| x == "crt") {
            std::fs::copy(e.path(), ctx.join("ca").join(e.file_name())).unwrap();
        }
    }
    std::fs::write(
        ctx.join("Dockerfile"),
        "FROM nestless-test/debian:sid\n\
         RUN apt-get update && apt-get install -y --no-install-recommends rustc cargo gcc \
         libc6-dev ca-certificates && rm -rf /var/lib/apt/lists/*\n\
         COPY ca/ /usr/local/share/ca-certificates/\n\
         RUN update-ca-certificates\n",
    )
    .unwrap();
    let r = run(
        d.command(&[
            "build",
            "--network",
            "host",
            "-t",
            "nestless-test/rust:sid",
            &ctx.to_string_lossy(),
        ]),
        None,
        BUILD_TIMEOUT,
    );
    assert_eq!(
        r.code, 0,
        "the Rust base image:\n{}\n{}",
        r.stdout, r.stderr
    );

    let ws = workspace();
    let r = run(
        d.command(&[
            "build",
            "--network",
            "host",
            "--build-arg",
            "RUST_IMAGE=nestless-test/rust:sid",
            "--build-arg",
            "BASE_IMAGE=nestless-test/debian:sid",
            "-t",
            "nestless-test/nestless:test",
            &ws.to_string_lossy(),
        ]),
        None,
        BUILD_TIMEOUT,
    );
    assert_eq!(
        r.code, 0,
        "docker build of the Dockerfile:\n{}\n{}",
        r.stdout, r.stderr
    );

    // The agent's image checks the shipped example configuration.
    let out = d.docker_ok(&[
        "run",
        "--rm",
        "nestless-test/nestless:test",
        "--config",
        "/usr/share/nestless/config/netagent.toml",
        "--check-config",
    ]);
    eprintln!("[dockerfile] --check-config: {}", out.trim());

    // The image's shim: static, and it runs a container under containerd.
    let bin = d.dir().join("image-bin");
    std::fs::create_dir_all(&bin).unwrap();
    let name = random_name("nlimg");
    d.docker_ok(&["create", "--name", &name, "nestless-test/nestless:test"]);
    d.docker_ok(&[
        "cp",
        &format!("{name}:/usr/local/bin/containerd-shim-nestless-v2"),
        &bin.to_string_lossy(),
    ]);
    d.docker_ok(&["rm", &name]);
    let shim = bin.join("containerd-shim-nestless-v2");
    let mut c = Command::new("readelf");
    c.arg("-l").arg(&shim);
    let headers = run(c, None, Duration::from_secs(30)).ok();
    assert!(
        !headers.contains("Requesting program interpreter"),
        "the image's shim is not static"
    );
    let c = Containerd::start(Options {
        shim: Some(shim),
        ..Options::default()
    });
    let ns = random_name("nl");
    c.import_busybox(&ns);
    let mut args: Vec<String> = vec!["run".into(), "--rm".into()];
    args.extend(c.runtime_args());
    args.extend([
        BUSYBOX_IMAGE.into(),
        "img".into(),
        "echo".into(),
        "from-the-image".into(),
    ]);
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    assert_eq!(c.ctr_ok(&ns, &a).trim(), "from-the-image");
    c.assert_no_shim_left(&ns, Duration::from_secs(10));
    for image in ["nestless-test/nestless:test", "nestless-test/rust:sid"] {
        let _ = d.docker(&["rmi", "-f", image]);
    }
}
