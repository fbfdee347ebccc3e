//! `nestlessctl plan` end to end on small files: outputs, annotations, bad rows.
use std::path::Path;
use std::process::Command;

const PRICES: &str = "name,class,memory,vcpu,zone,price\n\
,,,,,\n\
m5.large,m5,8,2,\"a, b\",0.096\n\
m5.xlarge,m5,16,4,\"a, b\",0.192\n\
m5.2xlarge,m5,32,8,\"a, b\",0.384\n\
c5.large,c5,4,2,x,0.085\n\
r5.large,r5,16,2,x,0.126\n";

fn write(dir: &Path, name: &str, text: &str) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

fn ctl() -> Command {
    Command::new(env!("CARGO_BIN_EXE_nestlessctl"))
}

#[test]
fn plans_a_pods_csv_with_all_outputs() {
    let dir = tempfile::tempdir().unwrap();
    let prices = write(dir.path(), "prices.csv", PRICES);
    let pods = write(
        dir.path(),
        "pods.csv",
        "client,pod,container,cpu,memory\n\
         alice,web,a,1,4\nalice,web,b,1,4\nalice,web,c,1,4\nalice,web,d,1,4\nalice,web,e,1,4\n\
         bob,db,pg,2,8\n",
    );
    let svg = dir.path().join("cdf.svg");
    let ann = dir.path().join("ann.jsonl");
    let out = ctl()
        .args([
            "plan",
            "--format",
            "json",
            "--families",
            "m5",
            "--threads",
            "2",
        ])
        .arg("--pods")
        .arg(&pods)
        .arg("--prices")
        .arg(&prices)
        .arg("--svg")
        .arg(&svg)
        .arg("--emit-annotations")
        .arg(&ann)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let clients = v["clients"].as_array().unwrap();
    assert_eq!(clients.len(), 2);
    let alice = clients.iter().find(|c| c["client"] == "alice").unwrap();
    // (a) m5.2xlarge 0.384; (b) m5.xlarge + m5.large 0.288: 25 % less.
    assert_eq!(alice["cost_whole"].as_f64().unwrap(), 0.384);
    assert_eq!(alice["cost_hostlo"].as_f64().unwrap(), 0.288);
    assert!((alice["saving_pct"].as_f64().unwrap() - 25.0).abs() < 1e-9);
    assert_eq!(alice["verdict"], "saves");
    assert_eq!(alice["bound_whole"].as_f64().unwrap(), 0.384);
    assert_eq!(alice["bound_hostlo"].as_f64().unwrap(), 0.288);
    let bob = clients.iter().find(|c| c["client"] == "bob").unwrap();
    assert_eq!(bob["verdict"], "single-container");
    assert_eq!(v["summary"]["with_saving"], 1);
    assert_eq!(v["summary"]["planned"], 2);
    let svg = std::fs::read_to_string(&svg).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("<path"));
    let ann = std::fs::read_to_string(&ann).unwrap();
    let docs: Vec<serde_json::Value> = ann
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(docs.len(), 1);
    assert_eq!(docs[0]["pod"], "web");
    let parts = docs[0]["parts"].as_array().unwrap();
    assert_eq!(parts.len(), 2);
    let mut containers: Vec<String> = parts
        .iter()
        .flat_map(|p| {
            p["containers"]
                .as_array()
                .unwrap()
                .iter()
                .map(|c| c.as_str().unwrap().to_string())
        })
        .collect();
    containers.sort();
    assert_eq!(containers, ["a", "b", "c", "d", "e"]);
    for (k, p) in parts.iter().enumerate() {
        assert_eq!(p["annotations"]["io.nestless.hostlo/part"], k.to_string());
        assert_eq!(
            p["annotations"]["io.nestless.hostlo/pod"],
            docs[0]["hostlo_pod"]
        );
    }

    // CSV output: a header and one row per client.
    let out = ctl()
        .args(["plan", "--format", "csv", "--families", "m5"])
        .arg("--pods")
        .arg(&pods)
        .arg("--prices")
        .arg(&prices)
        .output()
        .unwrap();
    assert!(out.status.success());
    let csv = String::from_utf8(out.stdout).unwrap();
    assert!(csv.starts_with("client,pods,containers,"));
    assert_eq!(csv.lines().count(), 3);
    // Table output ends with the summary.
    let out = ctl()
        .arg("plan")
        .arg("--pods")
        .arg(&pods)
        .arg("--prices")
        .arg(&prices)
        .output()
        .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.contains("clients with a proven saving: 1 of 2 = 50.0 %"),
        "{text}"
    );
    // Both plans proven optimal; bob's single pod is single-container.
    assert!(
        text.contains("gap to the lower bound (a): 2 proven optimal"),
        "{text}"
    );
    assert!(text.contains("1 with single-container pods only"), "{text}");
}

#[test]
fn malformed_rows_fail_with_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let prices = write(dir.path(), "prices.csv", PRICES);
    let pods = write(
        dir.path(),
        "pods.csv",
        "client,pod,container,cpu,memory\nalice,web,a,1,4\nalice,web,b,one,4\n",
    );
    let out = ctl()
        .arg("plan")
        .arg("--pods")
        .arg(&pods)
        .arg("--prices")
        .arg(&prices)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("pods.csv:3: field `cpu` = \"one\" is not a valid non-negative number"),
        "{err}"
    );

    let bad_prices = write(dir.path(), "bad.csv", &PRICES.replace("0.085", ""));
    let out = ctl()
        .arg("plan")
        .arg("--pods")
        .arg(&pods)
        .arg("--prices")
        .arg(&bad_prices)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("bad.csv:6: field `price` is empty"), "{err}");

    // A gzip trace shard with a short row on line 2.
    let gz = dir.path().join("task_events.csv.gz");
    {
        use std::io::Write;
        let mut e = flate2::write::GzEncoder::new(
            std::fs::File::create(&gz).unwrap(),
            flate2::Compression::fast(),
        );
        e.write_all(b"0,,1,0,,0,u,3,9,0.1,0.1,0,0\n0,,1,1,,0,u,3,9,0.1\n")
            .unwrap();
        e.finish().unwrap();
    }
    let out = ctl()
        .arg("plan")
        .arg("--google")
        .arg(&gz)
        .arg("--prices")
        .arg(&prices)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("task_events.csv.gz:2: expected 13 fields, found 10"),
        "{err}"
    );
}

/// Issue 14, case 6: an unknown family, or a trace-only option with `--pods`, is an error
/// (not silently ignored); nothing planned prints no `-0.00`.
#[test]
fn options_that_do_not_apply_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let prices = write(dir.path(), "prices.csv", PRICES);
    let pods = write(
        dir.path(),
        "pods.csv",
        "client,pod,container,cpu,memory\nalice,web,a,1,4\n",
    );
    let run = |extra: &[&str]| {
        ctl()
            .arg("plan")
            .arg("--pods")
            .arg(&pods)
            .arg("--prices")
            .arg(&prices)
            .args(extra)
            .output()
            .unwrap()
    };
    let out = run(&["--families", "m5,z9"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("prices.csv: no instance type of family [\"z9\"] (the list has c5, m5, r5)"),
        "{err}"
    );
    for opt in ["--cpu-scale", "--mem-scale", "--at"] {
        let out = run(&[opt, "16"]);
        assert!(!out.status.success(), "{opt}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(&format!("{opt} applies to --google input only")),
            "{err}"
        );
    }
    // A pod that fits no VM: nothing planned, and no negative zero anywhere.
    let big = write(
        dir.path(),
        "big.csv",
        "client,pod,container,cpu,memory\nalice,web,a,200,4\n",
    );
    let out = ctl()
        .arg("plan")
        .arg("--pods")
        .arg(&big)
        .arg("--prices")
        .arg(&prices)
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(!text.contains("-0.0"), "{text}");
}

/// Issue 14, case 3 through the command: a 1e30 request names its line; a CRLF file
/// names the right line.
#[test]
fn absurd_requests_and_crlf_name_the_line() {
    let dir = tempfile::tempdir().unwrap();
    let prices = write(dir.path(), "prices.csv", PRICES);
    for (text, want) in [
        (
            "client,pod,container,cpu,memory\nu,p,a,1e30,1\nu,p,b,0.002,1\n",
            "pods.csv:2: field `cpu` = \"1e30\" is above the limit of 1000000 vCPU",
        ),
        (
            "client,pod,container,cpu,memory\r\nu,p,a,1,1\r\nu,p,b,x,1\r\n",
            "pods.csv:3: field `cpu` = \"x\"",
        ),
        (
            "client,pod,container,cpu,memory\ru,p,a,1,1\r\ru,p,b,x,1\r",
            "pods.csv:4: field `cpu` = \"x\"",
        ),
    ] {
        let pods = write(dir.path(), "pods.csv", text);
        let out = ctl()
            .arg("plan")
            .arg("--pods")
            .arg(&pods)
            .arg("--prices")
            .arg(&prices)
            .output()
            .unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(want), "{err}");
    }
}

/// `--time-limit`: 0 keeps the heuristic (bounds from capacity only), a bad value is an
/// error.
#[test]
fn time_limit_option() {
    let dir = tempfile::tempdir().unwrap();
    let prices = write(dir.path(), "prices.csv", PRICES);
    let pods = write(
        dir.path(),
        "pods.csv",
        "client,pod,container,cpu,memory\nalice,web,a,1,4\nalice,web,b,1,4\nalice,web,c,1,4\n",
    );
    let run = |limit: &str| {
        ctl()
            .arg("plan")
            .arg("--pods")
            .arg(&pods)
            .arg("--prices")
            .arg(&prices)
            .args([
                "--format",
                "json",
                "--families",
                "m5",
                "--time-limit",
                limit,
            ])
            .output()
            .unwrap()
    };
    for bad in ["-1", "NaN", "1e9"] {
        let out = run(bad);
        assert!(!out.status.success(), "{bad}");
    }
    let err = String::from_utf8_lossy(&run("1e9").stderr).to_string();
    assert!(
        err.contains("--time-limit 1000000000: must be a number of seconds from 0 to 86400"),
        "{err}"
    );
    let out = run("0");
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let alice = &v["clients"][0];
    // 3 vCPU / 12 GiB: (a) m5.xlarge; (b) the same. The capacity bound (1.5 m5.large) is
    // below, so without the exact part nothing is proven.
    assert_eq!(alice["cost_whole"].as_f64().unwrap(), 0.192);
    assert!(alice["bound_whole"].as_f64().unwrap() < 0.192);
    assert_eq!(alice["verdict"], "undecided");
    let out = run("1");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["clients"][0]["verdict"], "no-saving");
}
