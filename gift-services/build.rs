use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    let protos = ["proto/gift/v1/wallet.proto"];
    tonic_prost_build::configure()
        .file_descriptor_set_path(out_dir.join("gift_descriptor.bin"))
        .compile_protos(&protos, &["proto"])?;
    for proto in protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    println!("cargo:rerun-if-changed=migrations");
    Ok(())
}
