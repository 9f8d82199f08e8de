//! The README's first command, `make demo`, runs `marklb-demo`. This runs the same program with
//! small numbers, so a change that breaks the demo fails `make test` too (the mark-earning
//! policy once did: UDP flows earn their marks only after a few datagrams, and the demo waited
//! for a mark after one). The demo checks what it shows itself: every new flow gets its mark,
//! no connection or UDP flow changes real, packets take the mark fast path.

use std::process::Command;

#[test]
fn the_demo_runs_the_whole_loop() {
    marklb_tests::netns::require_root("the demo");
    let before = namespaces();
    let out = Command::new(env!("CARGO_BIN_EXE_marklb-demo"))
        .args(["--connections", "40", "--connections-v6", "10"])
        .args(["--udp-flows", "20", "--rounds", "2"])
        .output()
        .expect("running marklb-demo");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    println!("{stdout}");
    assert!(
        out.status.success(),
        "marklb-demo failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    // What a reader of the demo looks for: the fast path in the table, and nothing left behind.
    assert!(
        stdout.contains("mark fast path"),
        "no mark fast path row:\n{stdout}"
    );
    assert_eq!(namespaces(), before, "network namespaces left behind");
}

/// The test topologies' network namespaces (a test cluster's nodes may come and go meanwhile).
fn namespaces() -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir("/run/netns")
        .map(|d| {
            d.filter_map(|e| Some(e.ok()?.file_name().to_string_lossy().into_owned()))
                .filter(|n| n.starts_with(marklb_tests::netns::NAME_PREFIX))
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}
