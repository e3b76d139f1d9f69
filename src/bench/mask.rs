//! `bench mask`: how fast the masking rules get through the standard workload's text,
//! clean (the usual case: one pre-filter pass per field) and with a secret in every
//! record, with the secret rules alone and with the PII rules too. The last line
//! printed is machine-readable: `mask_mb_s=… mask_with_secrets_mb_s=… mask_pii_mb_s=…`.

use std::io::Write as _;
use std::time::Instant;

use super::{payload_bytes, Workload};
use crate::mask::Masker;
use crate::model::Interaction;

/// Options of `bench mask`.
#[derive(Debug, Clone, clap::Args)]
pub struct MaskBenchArgs {
    /// Interactions to mask.
    #[arg(long, default_value_t = 20_000)]
    pub records: u64,
    /// Seed of the workload's content.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
}

/// Runs the benchmark and prints its table to stdout.
pub fn run_mask(args: MaskBenchArgs) -> anyhow::Result<()> {
    let mut workload = Workload::new(args.seed);
    let clean: Vec<Interaction> = (0..args.records).map(|i| workload.record(i)).collect();
    let with_secrets: Vec<Interaction> = clean
        .iter()
        .map(|r| {
            let mut r = r.clone();
            if let Some(call) = r.tool_calls.first_mut() {
                let observation = call.tool_observation.get_or_insert_with(String::new);
                observation.push_str("\nDB_PASSWORD=Xk29sLq81mZt\napiVersion: v1");
            }
            r
        })
        .collect();
    let bytes: u64 = clean.iter().map(|r| payload_bytes(r) as u64).sum();
    let secrets = Masker::new(false, &[])?;
    let pii = Masker::new(true, &[])?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "opsagent-audit bench mask: {} interactions, {:.1} MB of text", args.records, bytes as f64 / 1e6)?;
    writeln!(out, "{:<34} {:>9} {:>11} {:>9} {:>8}", "case", "seconds", "records/s", "MB/s", "masked")?;
    let mut line = Vec::new();
    for (name, key, masker, records) in [
        ("secret rules, clean text", "mask_mb_s", &secrets, &clean),
        ("secret rules, a secret per record", "mask_with_secrets_mb_s", &secrets, &with_secrets),
        ("secret + PII rules, clean text", "mask_pii_mb_s", &pii, &clean),
    ] {
        // Cloning is not masking: the copies are made before the clock starts.
        let mut batch: Vec<Interaction> = records.clone();
        let started = Instant::now();
        let masked: usize = batch.iter_mut().map(|r| masker.mask_record(r)).sum();
        let secs = started.elapsed().as_secs_f64().max(1e-9);
        let mb_s = bytes as f64 / 1e6 / secs;
        writeln!(out, "{name:<34} {secs:>9.3} {:>11.0} {mb_s:>9.1} {masked:>8}", args.records as f64 / secs)?;
        line.push(format!("{key}={mb_s:.0}"));
    }
    writeln!(out, "{}", line.join(" "))?;
    Ok(())
}
