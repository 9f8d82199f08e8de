use which::which;

/// Rebuild the object when bpf-linker changes (a new linker can emit different code).
fn main() {
    let bpf_linker = which("bpf-linker").expect("bpf-linker not found: run scripts/setup.sh");
    println!(
        "cargo:rerun-if-changed={}",
        bpf_linker.to_str().expect("utf-8 path")
    );
}
