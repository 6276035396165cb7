//! Generates the gRPC code from `proto/` with protox, a pure-Rust protobuf
//! compiler, so building needs no system `protoc`. The encoded file
//! descriptor set is written next to the generated code for server reflection.
//!
//! Also generates a client for the part of etcd's v3 API that
//! `agsync-bench` drives etcd with (`bench/etcd-proto`, see its headers);
//! only the bench includes it.

use std::path::PathBuf;

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = ["proto/agsync/v1/sync.proto"];
    println!("cargo:rerun-if-changed=proto");
    println!("cargo:rerun-if-changed=bench/etcd-proto");
    // sqlx::migrate! embeds migrations/ at compile time; without this a new
    // migration file would not trigger a rebuild.
    println!("cargo:rerun-if-changed=migrations");
    let fds = protox::compile(protos, ["proto"])?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out_dir.join("agsync_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // prost's codec with smaller buffers (see src/codec.rs).
        .codec_path("crate::codec::Codec")
        .compile_fds(fds)?;
    let etcd = protox::compile(["etcd/etcdserverpb/rpc.proto"], ["bench/etcd-proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(false)
        .compile_fds(etcd)?;
    Ok(())
}
