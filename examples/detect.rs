//! Prints this machine's hardware profile as pretty JSON.
//!
//! ```text
//! cargo run --release --example detect
//! ```

use clap::Parser;

/// Prints this machine's hardware profile as pretty JSON (and its class,
/// preferred device and how long the profile took on stderr).
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    Args::parse();
    let started = std::time::Instant::now();
    let profile = hw_detect::HardwareProfile::detect()?;
    let took = started.elapsed();
    println!("{}", serde_json::to_string_pretty(&profile)?);
    eprintln!(
        "class {:?}, preferred device {:?}, profile taken in {:.2} ms",
        profile.class,
        profile.preferred_device(),
        took.as_secs_f64() * 1e3
    );
    Ok(())
}
