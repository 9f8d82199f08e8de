//! Builds the XDP object with the nightly toolchain and embeds it in the agent, so a plain
//! `cargo build` is all a user runs (aya-template pattern). Set AYA_BUILD_SKIP=1 to skip
//! (clippy of user space on machines without bpf-linker).
fn main() -> anyhow::Result<()> {
    // Read at run time, not baked in with env!(): a build-script binary reused from another
    // checkout's target directory would otherwise build that checkout's eBPF sources.
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR")?;
    let root_dir = format!("{manifest_dir}/../ebpf/prog");
    let ebpf = aya_build::Package {
        name: "marklb-ebpf",
        root_dir: &root_dir,
        ..Default::default()
    };
    aya_build::build_ebpf([ebpf], aya_build::Toolchain::default())
}
