//! Generates the gRPC code from `proto/` with protox, a pure-Rust protobuf
//! compiler, so building needs no system `protoc`. The encoded file
//! descriptor set is written next to the generated code for server reflection.
//! (The bench, `bench/`, is a crate of its own and compiles etcd's protos
//! in its own build script.)

use std::path::PathBuf;

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = ["proto/agsync/v1/sync.proto"];
    println!("cargo:rerun-if-changed=proto");
    // sqlx::migrate! embeds migrations/ at compile time; without this a new
    // migration file would not trigger a rebuild.
    println!("cargo:rerun-if-changed=migrations");
    let fds = protox::compile(protos, ["proto"])?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out_dir.join("agsync_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // prost's codec with smaller buffers (see src/api/codec.rs).
        .codec_path("crate::api::codec::Codec")
        .compile_fds(fds)?;
    Ok(())
}
