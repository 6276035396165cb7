//! Generates a client for the part of etcd's v3 API that `agsync-bench`
//! drives etcd with (`etcd-proto/`, see its headers), with protox, a
//! pure-Rust protobuf compiler: no system `protoc`. Only the bench builds
//! etcd's protos; the server's build never does.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=etcd-proto");
    let etcd = protox::compile(["etcd/etcdserverpb/rpc.proto"], ["etcd-proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(false)
        .compile_fds(etcd)?;
    Ok(())
}
