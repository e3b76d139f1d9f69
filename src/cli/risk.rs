//! `risk --test "COMMAND"`: how a tool call would be classified, and why.

use std::io::Write;

use clap::{Args, ValueEnum};

use crate::config::RiskConfig;
use crate::risk::{Explanation, RiskClassifier};

/// `risk` options.
#[derive(Debug, Args)]
pub struct RiskArgs {
    /// The tool input to classify, as an agent would send it (`kubectl delete pod x`,
    /// `{"command": "…"}`, `DROP TABLE t`).
    #[arg(long = "test", value_name = "INPUT")]
    pub input: String,
    /// The tool name the input is given to (`kubectl`, `helm`, `sql`, `shell`…).
    #[arg(long, default_value = "shell")]
    pub tool: String,
    /// Output format.
    #[arg(long, value_enum, default_value_t = RiskFormat::Table)]
    pub format: RiskFormat,
}

/// How `risk --test` prints its explanation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum RiskFormat {
    /// Lines for people.
    Table,
    /// One JSON object.
    Json,
}

/// Explains the verdict of the configured rules (custom ones and overrides included),
/// whether or not classification is enabled.
pub fn run_risk_test(config: &RiskConfig, args: RiskArgs) -> anyhow::Result<()> {
    let classifier = RiskClassifier::new(config)?;
    let explanation = classifier.explain(&args.tool, &args.input);
    let mut out = std::io::stdout().lock();
    match args.format {
        RiskFormat::Json => {
            serde_json::to_writer_pretty(&mut out, &explanation)?;
            writeln!(out)?;
        }
        RiskFormat::Table => write_table(&mut out, &explanation)?,
    }
    Ok(())
}

fn write_table(out: &mut impl Write, e: &Explanation) -> std::io::Result<()> {
    writeln!(out, "tool: {}", e.tool_name)?;
    for (n, command) in e.commands.iter().enumerate() {
        let words: Vec<String> = command.words.iter().map(|w| format!("{w:?}")).collect();
        writeln!(out, "command {}: [{}]", n + 1, words.join(", "))?;
        for rule in &command.rules {
            writeln!(out, "  rule {} → {}", rule.rule, rule.level)?;
        }
        if command.rules.is_empty() {
            writeln!(out, "  no rule")?;
        }
    }
    for rule in &e.custom_rules {
        writeln!(out, "custom rule {} → {}", rule.rule, rule.level)?;
    }
    let rule = e.verdict.rule.as_deref().unwrap_or("-");
    writeln!(out, "verdict: {} ({rule})", e.verdict.level)
}
