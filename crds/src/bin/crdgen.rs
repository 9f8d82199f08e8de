//! Writes the CRDs generated from the Rust types to `crds/yaml/` (both variants), or prints
//! them as one multi-document YAML stream.
//!
//! Usage: `cargo run -p marklb-crds --bin crdgen [-- --out DIR | --stdout [--legacy]]`.
//! The committed files must match what this writes (a unit test checks it).

use std::path::PathBuf;
use std::process::ExitCode;

use marklb_crds::crd;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("crdgen: {e}");
            eprintln!("usage: crdgen [--out DIR | --stdout [--legacy]]");
            ExitCode::from(2)
        }
    }
}

fn run(args: &[String]) -> Result<(), String> {
    let mut out = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/yaml"));
    let mut stdout = false;
    let mut legacy = false;
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--out" => out = PathBuf::from(it.next().ok_or("--out needs a directory")?),
            "--stdout" => stdout = true,
            "--legacy" => legacy = true,
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    if legacy && !stdout {
        return Err(
            "--legacy only applies to --stdout (files are written in both variants)".into(),
        );
    }

    if stdout {
        for c in crd::crds() {
            let c = if legacy { crd::without_cel(&c) } else { c };
            print!("---\n{}", crd::to_yaml(&c));
        }
        return Ok(());
    }

    for file in crd::generated_files() {
        let path = out.join(&file.path);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        }
        std::fs::write(&path, &file.contents).map_err(|e| format!("{}: {e}", path.display()))?;
        println!("wrote {}", path.display());
    }
    Ok(())
}
