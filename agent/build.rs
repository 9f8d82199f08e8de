//! Builds the XDP object with the nightly toolchain and embeds it in the agent, so a plain
//! `cargo build` is all a user runs (aya-template pattern). Set AYA_BUILD_SKIP=1 to skip
//! (clippy of user space on machines without bpf-linker).
fn main() -> anyhow::Result<()> {
    let ebpf = aya_build::Package {
        name: "marklb-ebpf",
        root_dir: concat!(env!("CARGO_MANIFEST_DIR"), "/../ebpf/prog"),
        ..Default::default()
    };
    aya_build::build_ebpf([ebpf], aya_build::Toolchain::default())
}
