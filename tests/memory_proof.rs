//! The runtime under real cgroup memory limits (needs root; CI runs as
//! root). A run that cannot make a cgroup fails with the reason: a proof
//! that silently does not run proves nothing. The full table is
//! `cargo run --release --example memory_proof`.

#[path = "../examples/memory_proof/proof.rs"]
#[allow(dead_code, unreachable_pub)]
mod proof;

const CHILD: &str = "SNUG_MEMORY_PROOF_CHILD";

#[test]
fn under_cgroup_limits_no_oom_and_the_model_serves_with_room() {
    if let Err(e) = models::model_dir() {
        panic!("{e}");
    }
    let version =
        proof::cgroup_version().unwrap_or_else(|e| panic!("cannot make a memory cgroup: {e}"));
    let exe = std::env::current_exe().unwrap();
    let mut runs = Vec::new();
    for mib in [64u64, 128, 256, 512] {
        let run = proof::run_limited(
            version,
            mib << 20,
            &exe,
            &[
                "--exact",
                "child_process",
                "--include-ignored",
                "--nocapture",
            ],
            &[(CHILD, "16")],
        )
        .unwrap();
        runs.push(run);
    }
    let table = proof::table(&runs);
    println!("{table}");
    let failures = proof::check(&runs, 1.5);
    assert!(failures.is_empty(), "{failures:#?}\n{table}");
    // The largest limit has room for the model: it must have served.
    assert!(runs.last().unwrap().local(), "{table}");
}

/// The child of the test above, run by it inside a cgroup.
#[test]
#[ignore = "the child process of under_cgroup_limits_no_oom_and_the_model_serves_with_room, which runs it"]
fn child_process() {
    let Ok(texts) = std::env::var(CHILD) else {
        // Not started by the cgroup test (e.g. `--include-ignored`): it is the
        // child's entry point, with nothing to check on its own.
        println!("{CHILD} is not set: this is the cgroup test's child entry point");
        return;
    };
    let texts: usize = texts.parse().unwrap();
    proof::child(texts).unwrap();
}
