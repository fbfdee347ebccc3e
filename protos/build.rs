//! Generates the Rust for `proto/` into `OUT_DIR` with ttrpc-codegen.

use std::{env, fs, path::PathBuf};

use ttrpc_codegen::{Codegen, Customize, ProtobufCustomize};

fn main() {
    let out = PathBuf::from(env::var("OUT_DIR").expect("OUT_DIR")).join("agent");
    fs::create_dir_all(&out).expect("create OUT_DIR/agent");
    let proto = "proto/nestless/agent/v1/agent.proto";
    println!("cargo:rerun-if-changed={proto}");
    Codegen::new()
        .input(proto)
        .include("proto")
        .rust_protobuf()
        .rust_protobuf_customize(ProtobufCustomize::default().gen_mod_rs(false))
        .customize(Customize {
            async_all: true,
            ..Default::default()
        })
        .out_dir(&out)
        .run()
        .expect("generate ttrpc code for agent.proto");
    // `include!` cannot take inner attributes or inner doc comments: strip them.
    for entry in fs::read_dir(&out).expect("read generated dir") {
        let path = entry.expect("dir entry").path();
        let text = fs::read_to_string(&path).expect("read generated file");
        let kept: Vec<&str> = text
            .lines()
            .filter(|l| !l.starts_with("#!") && !l.starts_with("//!"))
            .collect();
        fs::write(&path, kept.join("\n")).expect("write generated file");
    }
}
