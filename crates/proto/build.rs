//! Compiles `proto/livemesh/v1/*.proto` with protox (pure Rust), so a fresh
//! clone builds without a system `protoc`.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Read at run time, not baked in with env!: worktrees sharing one
    // target dir share this script's binary, and each must compile its own protos.
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("../../proto");
    let dir = root.join("livemesh/v1");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|path| path.extension().is_some_and(|ext| ext == "proto"))
        .collect();
    files.sort();
    println!("cargo:rerun-if-changed={}", dir.display());
    for file in &files {
        println!("cargo:rerun-if-changed={}", file.display());
    }

    let fds = protox::compile(&files, [&root])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    // The encoded descriptor set feeds server reflection, so reflection always
    // describes exactly the contract the code was generated from.
    std::fs::write(
        out.join("livemesh_descriptor.bin"),
        prost::Message::encode_to_vec(&fds),
    )?;
    tonic_prost_build::configure()
        // Small per-call buffers: see src/codec.rs.
        .codec_path("crate::codec::LeanCodec")
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;

    // SubscribeService once more, server side only, with `Subscribe`'s
    // responses written from pre-encoded bytes (src/encoded.rs): a node
    // encodes each event once, not once per stream. Same routes, same wire
    // format; the request side stays prost (with LeanCodec's decoder).
    let encoded = out.join("encoded");
    std::fs::create_dir_all(&encoded)?;
    let method = |name: &str, route: &str, input: &str, output: &str, codec: &str| {
        tonic_build::manual::Method::builder()
            .name(name)
            .route_name(route)
            .input_type(input)
            .output_type(output)
            .codec_path(codec)
    };
    let subscribe = tonic_build::manual::Service::builder()
        .name("SubscribeService")
        .package("livemesh.v1")
        .method(
            method(
                "subscribe",
                "Subscribe",
                "crate::v1::SubscribeRequest",
                "crate::encoded::Frame",
                "crate::encoded::FrameCodec",
            )
            .server_streaming()
            .build(),
        )
        .method(
            method(
                "deliver",
                "Deliver",
                "crate::v1::DeliverRequest",
                "crate::v1::DeliverResponse",
                "crate::codec::LeanCodec",
            )
            .build(),
        )
        .build();
    tonic_build::manual::Builder::new()
        .build_client(false)
        .out_dir(&encoded)
        .compile(&[subscribe]);
    Ok(())
}
