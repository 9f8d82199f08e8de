//! `installgen`: writes the generated install files (see the library docs), or with `--check`
//! lists the stale ones and exits 1.
//!
//! Usage: `cargo run -p marklb-installgen [-- --check]`.

use std::process::ExitCode;

use marklb_installgen::{REGENERATE, drift, generated_files, repo_root};

fn main() -> ExitCode {
    let root = repo_root();
    let check = match std::env::args().nth(1).as_deref() {
        None => false,
        Some("--check") => true,
        Some(other) => {
            eprintln!("installgen: unknown argument {other:?}; usage: installgen [--check]");
            return ExitCode::from(2);
        }
    };
    let result = if check {
        drift(&root).map(|stale| {
            for s in &stale {
                eprintln!("stale: {s} (run `{REGENERATE}`)");
            }
            stale.is_empty()
        })
    } else {
        generated_files(&root).and_then(|files| {
            for f in files {
                let path = root.join(&f.path);
                if let Some(dir) = path.parent() {
                    std::fs::create_dir_all(dir)?;
                }
                std::fs::write(&path, &f.contents)?;
                println!("wrote {}", f.path.display());
            }
            Ok(true)
        })
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("installgen: {e}");
            ExitCode::FAILURE
        }
    }
}
