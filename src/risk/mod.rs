//! Risk: what each tool call could do to production, classified at ingest.
//!
//! An auditor's first question of an ops agent's log is what it DID: which deletes,
//! drains, execs, secret reads and scale-downs it ran. Every tool call gets a
//! [`RiskLevel`] and the name of the rule that set it (`risk_level`, `risk_rule`), and
//! the interaction the highest level and how many calls were flagged.
//!
//! The input is parsed, not grepped: a tool input in agent style (plain text or JSON,
//! see [`command`]) is cut into simple commands, wrappers (`sudo`, `env`, `sh -c`,
//! `kubectl exec … --`) are followed, and each command is judged by its program and
//! arguments ([`kubectl`], [`helm`], [`shell`], [`sql`]), so `kubectl get pods -l
//! app=delete-me` stays read-only. Custom rules (`audit.risk.rules`, a regex on the tool
//! name and one on the input) add to the built-in ones ([`BUILTIN_RULES`]); the highest
//! level wins, ties going to the first rule found. `audit.risk.overrides` sets any rule's
//! level.
//!
//! The [`RiskClassifier`] is a pipeline [`Stage`] placed after masking: it sees what is
//! stored (secrets already replaced), and runs for every path into the pipeline.
//!
//! Behaviour over time is watched by [`detect`] (a background job of `serve`, scoring
//! hourly series with [`anomaly`]); what it finds is stored, counted and, when
//! configured, sent to a webhook by [`alert`].

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};

use regex::Regex;
use serde::Serialize;

use crate::config::RiskConfig;
pub use crate::model::RiskLevel;
use crate::model::{Interaction, ToolCall};
use crate::pipeline::Stage;

pub mod alert;
pub mod anomaly;
mod command;
pub mod detect;
mod helm;
mod kubectl;
mod rules;
mod shell;
mod sql;

pub use rules::{builtin, BuiltinRule, BUILTIN_RULES};

/// Why a risk configuration cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum RiskError {
    /// A custom rule's pattern does not compile.
    #[error("risk rule `{rule}`: invalid {field} pattern: {cause}")]
    Pattern {
        /// The rule.
        rule: String,
        /// `tool` or `pattern`.
        field: &'static str,
        /// What the regex engine said.
        cause: regex::Error,
    },
    /// An override names no rule.
    #[error("audit.risk.overrides: `{0}` is neither a built-in rule nor one of audit.risk.rules")]
    UnknownRule(String),
}

/// One command found in a tool input, with the rules it triggered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finding {
    /// Its words as parsed (quotes removed, wrappers and redirections taken off).
    pub words: Vec<String>,
    /// The built-in rules it triggered (possibly several: `kubectl delete -A --as x`).
    pub rules: Vec<&'static str>,
}

/// A tool call's classification.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Verdict {
    /// The highest level found.
    pub level: RiskLevel,
    /// The rule that gave it; `None` when no rule matched.
    pub rule: Option<String>,
}

/// A verdict with how it was reached (`risk --test`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Explanation {
    /// The tool name the input was read for.
    pub tool_name: String,
    /// Every command found, in order.
    pub commands: Vec<ExplainedCommand>,
    /// Custom rules whose patterns matched.
    pub custom_rules: Vec<ExplainedRule>,
    /// The outcome.
    pub verdict: Verdict,
}

/// A command of an [`Explanation`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ExplainedCommand {
    /// Its words.
    pub words: Vec<String>,
    /// The rules it triggered, with their (configured) levels.
    pub rules: Vec<ExplainedRule>,
}

/// A rule and its level.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ExplainedRule {
    /// Rule name.
    pub rule: String,
    /// Its level (after overrides).
    pub level: RiskLevel,
}

struct CustomRule {
    name: String,
    level: RiskLevel,
    tool: Option<Regex>,
    pattern: Regex,
}

/// Classifies tool calls. Cheap to share (`Arc`), safe across threads.
pub struct RiskClassifier {
    levels: HashMap<&'static str, RiskLevel>,
    custom: Vec<CustomRule>,
    /// Calls flagged (above `none`) since start, by level.
    flagged: [AtomicU64; 5],
}

impl std::fmt::Debug for RiskClassifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RiskClassifier")
            .field("custom", &self.custom.iter().map(|r| &r.name).collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl RiskClassifier {
    /// The built-in rules, `config.rules` after them, levels changed by `config.overrides`
    /// (whether or not `config.enabled`).
    pub fn new(config: &RiskConfig) -> Result<RiskClassifier, RiskError> {
        let mut levels: HashMap<&'static str, RiskLevel> = BUILTIN_RULES.iter().map(|r| (r.name, r.level)).collect();
        let mut custom = Vec::with_capacity(config.rules.len());
        for rule in &config.rules {
            let compile = |field: &'static str, pattern: &str| {
                Regex::new(pattern).map_err(|cause| RiskError::Pattern { rule: rule.name.clone(), field, cause })
            };
            custom.push(CustomRule {
                name: rule.name.clone(),
                level: config.overrides.get(&rule.name).copied().unwrap_or(rule.level),
                tool: rule.tool.as_deref().map(|t| compile("tool", t)).transpose()?,
                pattern: compile("pattern", &rule.pattern)?,
            });
        }
        for (name, level) in &config.overrides {
            match levels.get_mut(name.as_str()) {
                Some(l) => *l = *level,
                None if custom.iter().any(|c| &c.name == name) => {}
                None => return Err(RiskError::UnknownRule(name.clone())),
            }
        }
        Ok(RiskClassifier { levels, custom, flagged: Default::default() })
    }

    /// The classifier `audit.risk` asks for, or `None` when classification is off.
    pub fn from_config(config: &RiskConfig) -> Result<Option<RiskClassifier>, RiskError> {
        if !config.enabled {
            return Ok(None);
        }
        RiskClassifier::new(config).map(Some)
    }

    fn level(&self, rule: &str) -> RiskLevel {
        self.levels.get(rule).copied().unwrap_or_default()
    }

    /// The commands of a tool call and the built-in rules they trigger.
    pub fn findings(tool_name: &str, input: &str) -> Vec<Finding> {
        let kind = command::ToolKind::of(tool_name);
        let mut out = Vec::new();
        match command::payload(kind, input) {
            command::Payload::Sql(text) => {
                out.push(Finding { words: vec![text.clone()], rules: sql::analyze(&text) });
            }
            command::Payload::Words(mut words) => {
                prepend_program(kind, &mut words);
                shell::analyze_words(words, None, &mut out, 0);
            }
            command::Payload::Script(text) => {
                let text = match kind {
                    // A bare `delete pod x` given to a kubectl tool.
                    command::ToolKind::Kubectl | command::ToolKind::Helm => {
                        let mut first = command::split_words(text.lines().next().unwrap_or_default());
                        if prepend_program(kind, &mut first) {
                            format!("{} {text}", first[0])
                        } else {
                            text
                        }
                    }
                    _ => text,
                };
                shell::analyze_script(&text, &mut out, 0);
            }
        }
        out
    }

    /// Classifies a tool call.
    pub fn classify(&self, tool_name: &str, input: &str) -> Verdict {
        let mut best: Option<(RiskLevel, &str)> = None;
        let findings = Self::findings(tool_name, input);
        let builtin = findings.iter().flat_map(|f| f.rules.iter().map(|r| (self.level(r), *r)));
        let custom = self
            .custom
            .iter()
            .filter(|c| c.tool.as_ref().is_none_or(|t| t.is_match(tool_name)) && c.pattern.is_match(input))
            .map(|c| (c.level, c.name.as_str()));
        for (level, rule) in builtin.chain(custom) {
            // Strictly higher: on a tie the first rule found names the verdict.
            if best.is_none_or(|(l, _)| level > l) {
                best = Some((level, rule));
            }
        }
        match best {
            Some((level, rule)) => Verdict { level, rule: Some(rule.to_owned()) },
            None => Verdict { level: RiskLevel::None, rule: None },
        }
    }

    /// Classifies a tool call and says how (`opsagent-audit risk --test`).
    pub fn explain(&self, tool_name: &str, input: &str) -> Explanation {
        let commands = Self::findings(tool_name, input)
            .into_iter()
            .map(|f| ExplainedCommand {
                rules: f.rules.iter().map(|r| ExplainedRule { rule: (*r).to_owned(), level: self.level(r) }).collect(),
                words: f.words,
            })
            .collect();
        let custom_rules = self
            .custom
            .iter()
            .filter(|c| c.tool.as_ref().is_none_or(|t| t.is_match(tool_name)) && c.pattern.is_match(input))
            .map(|c| ExplainedRule { rule: c.name.clone(), level: c.level })
            .collect();
        Explanation {
            tool_name: tool_name.to_owned(),
            commands,
            custom_rules,
            verdict: self.classify(tool_name, input),
        }
    }

    /// Sets a tool call's `risk_level` and `risk_rule`.
    pub fn classify_call(&self, call: &mut ToolCall) {
        let verdict = self.classify(&call.tool_name, &call.tool_input);
        if verdict.level > RiskLevel::None {
            self.flagged[verdict.level.rank() as usize].fetch_add(1, Ordering::Relaxed);
        }
        call.risk_level = verdict.level;
        call.risk_rule = verdict.rule;
    }

    /// Tool calls flagged since start, by level (`none` omitted).
    pub fn counts(&self) -> Vec<(RiskLevel, u64)> {
        RiskLevel::ALL[1..].iter().map(|l| (*l, self.flagged[l.rank() as usize].load(Ordering::Relaxed))).collect()
    }
}

/// Puts the program in front of words given to a kubectl or helm tool without it;
/// true if it did.
fn prepend_program(kind: command::ToolKind, words: &mut Vec<String>) -> bool {
    let (program, aliases): (&str, &[&str]) = match kind {
        command::ToolKind::Kubectl => ("kubectl", &["kubectl", "k", "oc", "kubectl.exe", "microk8s", "k3s", "sudo"]),
        command::ToolKind::Helm => ("helm", &["helm", "sudo"]),
        _ => return false,
    };
    match words.first() {
        Some(first) if aliases.contains(&command::program(first)) => false,
        _ => {
            words.insert(0, program.to_owned());
            true
        }
    }
}

impl Stage for RiskClassifier {
    /// Classifies every tool call and rolls the result up onto the interaction. Returns
    /// 0: no text is changed.
    fn process(&self, record: &mut Interaction) -> usize {
        for call in &mut record.tool_calls {
            self.classify_call(call);
        }
        record.roll_up_risk();
        0
    }
}

#[cfg(test)]
mod tests;
