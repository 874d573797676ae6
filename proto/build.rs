//! Generates the gRPC code with protox (a pure-Rust protobuf compiler), so building the
//! project never needs a system `protoc`.

use std::path::PathBuf;

use prost::Message as _;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "switchyard/v1/inference.proto",
        "switchyard/v1/worker.proto",
        "switchyard/v1/admin.proto",
    ];
    for proto in protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    let fds = protox::compile(protos, ["."])?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    // The encoded descriptor set feeds gRPC server reflection.
    std::fs::write(
        out_dir.join("switchyard_descriptor.bin"),
        fds.encode_to_vec(),
    )?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // Smaller first buffers per call (see src/codec.rs).
        .codec_path("crate::codec::SwitchyardCodec")
        // A stream event is relayed as the router keeps it, without a copy.
        .bytes(".switchyard.v1.ResponseStreamEvent.sse")
        .bytes(".switchyard.v1.HandedResponse.events")
        .bytes(".switchyard.v1.BatchAnswer.body")
        .bytes(".switchyard.v1.BytesPiece.bytes")
        .compile_fds(fds)?;
    Ok(())
}
