//! Compiles `proto/` into the contract crate with protox (pure Rust, no system
//! `protoc`), and writes the descriptor set that servers register for reflection.

use std::path::PathBuf;

use prost::Message;

const PROTOS: &[&str] = &[
    "keel/auth/v1/auth.proto",
    "keel/jobs/v1/jobs.proto",
    "keel/jobs/v1/schedules.proto",
    "keel/memory/v1/memory.proto",
    "keel/admin/v1/admin.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let fds = protox::compile(PROTOS, ["proto"])?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out_dir.join("keel_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}
