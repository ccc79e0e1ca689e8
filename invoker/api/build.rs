use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    let protos = [
        "proto/invoker/v1/types.proto",
        "proto/invoker/v1/admin.proto",
        "proto/invoker/v1/routing.proto",
        "proto/invoker/v1/agent.proto",
        "proto/invoker/v1/raft.proto",
    ];
    tonic_prost_build::configure()
        .file_descriptor_set_path(out_dir.join("invoker_descriptor.bin"))
        .compile_protos(&protos, &["proto"])?;
    for proto in protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    Ok(())
}
