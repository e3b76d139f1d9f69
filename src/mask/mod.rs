//! Masking: secrets (and, when asked, personal data) are replaced in a record's text
//! before the record is kept anywhere.
//!
//! An ops agent's audit log is full of secrets: it runs `kubectl get secret -o yaml`,
//! prints environment variables, and people paste tokens into questions. Every rule
//! replaces only the secret itself with a marker naming the rule
//! (`password=[MASKED:password_pair]`), so the text around it stays readable evidence.
//!
//! Cost: one [`RegexSet`] pass over a field tells which rules match at all; clean text
//! (most of it) costs that one pass, and only the rules that matched run again to find
//! and replace. Rules whose shape a regex cannot check alone (a Chinese ID's checksum, a
//! phone number not glued to other digits) carry a validator.
//!
//! The [`Masker`] is a pipeline [`Stage`](crate::pipeline::Stage): whoever builds the
//! logger from a configuration ([`Masker::from_config`]) hands it in, and the pipeline
//! runs it over every record before the record goes anywhere.

use std::borrow::Cow;
use std::sync::atomic::{AtomicU64, Ordering};

use regex::{Captures, Regex, RegexSet};

use crate::config::MaskingConfig;
use crate::pipeline::Stage;

mod k8s;
mod rules;

pub use rules::{builtin_rules, RuleSpec, Validator};

/// Why a set of rules cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum MaskError {
    /// A rule's pattern does not compile.
    #[error("masking rule `{rule}`: invalid pattern: {cause}")]
    Pattern {
        /// The rule.
        rule: String,
        /// What the regex engine said.
        cause: regex::Error,
    },
}

pub use crate::config::CustomRule;

/// A compiled rule.
struct Rule {
    name: String,
    regex: Regex,
    replacement: String,
    validate: Option<rules::Validator>,
    /// Keep this many leading characters of the match (IP truncation).
    keep_prefix: Option<fn(&str) -> usize>,
    masked: AtomicU64,
}

/// Replaces secrets in text. Cheap to share (`Arc`), safe across threads.
pub struct Masker {
    rules: Vec<Rule>,
    prefilter: RegexSet,
    /// Values of Kubernetes Secret manifests masked (by structure, not by a regex).
    k8s_masked: AtomicU64,
}

impl std::fmt::Debug for Masker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Masker").field("rules", &self.rules.iter().map(|r| &r.name).collect::<Vec<_>>()).finish()
    }
}

/// The marker that replaces a secret found by `rule`.
pub fn marker(rule: &str) -> String {
    format!("[MASKED:{rule}]")
}

impl Masker {
    /// The built-in secret rules, the PII rules when `pii`, then `custom`.
    pub fn new(pii: bool, custom: &[CustomRule]) -> Result<Masker, MaskError> {
        let mut specs: Vec<RuleSpec> = builtin_rules().into_iter().filter(|r| pii || !r.pii).collect();
        for c in custom {
            specs.push(RuleSpec {
                name: c.name.clone(),
                pattern: c.regex.clone(),
                replacement: c.replacement.clone(),
                pii: false,
                validate: None,
                keep_prefix: None,
            });
        }
        let mut rules = Vec::with_capacity(specs.len());
        for spec in specs {
            let regex =
                Regex::new(&spec.pattern).map_err(|cause| MaskError::Pattern { rule: spec.name.clone(), cause })?;
            rules.push(Rule {
                replacement: spec.replacement.unwrap_or_else(|| marker(&spec.name)),
                name: spec.name,
                regex,
                validate: spec.validate,
                keep_prefix: spec.keep_prefix,
                masked: AtomicU64::new(0),
            });
        }
        let prefilter = RegexSet::new(rules.iter().map(|r| r.regex.as_str()))
            .map_err(|cause| MaskError::Pattern { rule: "(set)".into(), cause })?;
        Ok(Masker { rules, prefilter, k8s_masked: AtomicU64::new(0) })
    }

    /// The masker `audit.masking` asks for, or `None` when masking is off.
    pub fn from_config(config: &MaskingConfig) -> Result<Option<Masker>, MaskError> {
        if !config.enabled {
            return Ok(None);
        }
        Masker::new(config.pii, &config.rules).map(Some)
    }

    /// Masks `text`; borrows it back unchanged when nothing matched.
    pub fn mask<'a>(&self, text: &'a str) -> Cow<'a, str> {
        let mut out = Cow::Borrowed(text);
        if let Some((masked, n)) = k8s::mask_secret_values(&out) {
            self.k8s_masked.fetch_add(n, Ordering::Relaxed);
            out = Cow::Owned(masked);
        }
        let hits = self.prefilter.matches(&out);
        if !hits.matched_any() {
            return out;
        }
        for index in hits.iter() {
            let rule = &self.rules[index];
            let replaced = apply(rule, &out);
            if let Some(replaced) = replaced {
                out = Cow::Owned(replaced);
            }
        }
        out
    }

    /// Masks a string in place; true if it changed.
    pub fn mask_in_place(&self, text: &mut String) -> bool {
        match self.mask(text) {
            Cow::Borrowed(_) => false,
            Cow::Owned(masked) => {
                *text = masked;
                true
            }
        }
    }

    /// Masks every text field of a record where a secret can hide: the question, each
    /// thought, each tool call's input, output and error, the answer, the error, the
    /// provider URL, and every string inside `attributes`. Returns the fields changed.
    pub fn mask_record(&self, record: &mut crate::model::Interaction) -> usize {
        let mut changed = usize::from(self.mask_in_place(&mut record.question));
        for text in [&mut record.final_answer, &mut record.error, &mut record.base_url, &mut record.endpoint]
            .into_iter()
            .flatten()
        {
            changed += usize::from(self.mask_in_place(text));
        }
        for thought in &mut record.thoughts {
            changed += usize::from(self.mask_in_place(&mut thought.content));
        }
        for call in &mut record.tool_calls {
            changed += usize::from(self.mask_in_place(&mut call.tool_input));
            for text in [&mut call.tool_observation, &mut call.error].into_iter().flatten() {
                changed += usize::from(self.mask_in_place(text));
            }
        }
        changed + self.mask_map(&mut record.attributes)
    }

    /// Masks the strings of a JSON value, however deep. An object's value is also
    /// masked whole when its key names a credential (`{"api_key": "…"}`), which the
    /// text rules cannot see once the key and value are apart.
    fn mask_json(&self, value: &mut serde_json::Value) -> usize {
        match value {
            serde_json::Value::String(text) => usize::from(self.mask_in_place(text)),
            serde_json::Value::Array(items) => items.iter_mut().map(|v| self.mask_json(v)).sum(),
            serde_json::Value::Object(map) => self.mask_map(map),
            _ => 0,
        }
    }

    fn mask_map(&self, map: &mut serde_json::Map<String, serde_json::Value>) -> usize {
        map.iter_mut()
            .map(|(key, v)| match v {
                serde_json::Value::String(text) if rules::is_secret_key(key) && !text.is_empty() => {
                    *text = marker("password_pair");
                    1
                }
                _ => self.mask_json(v),
            })
            .sum()
    }

    /// How many secrets each rule has masked since start, by rule name.
    pub fn counts(&self) -> std::collections::BTreeMap<String, u64> {
        let mut counts = std::collections::BTreeMap::new();
        for rule in &self.rules {
            *counts.entry(rule.name.clone()).or_insert(0) += rule.masked.load(Ordering::Relaxed);
        }
        counts.insert(k8s::RULE.to_owned(), self.k8s_masked.load(Ordering::Relaxed));
        counts
    }
}

/// Runs one rule over `text`; `None` when it replaced nothing (every match failed its
/// validator).
fn apply(rule: &Rule, text: &str) -> Option<String> {
    let mut changed = 0u64;
    let replaced = rule.regex.replace_all(text, |caps: &Captures<'_>| {
        let whole = caps.get(0).map_or(0..0, |m| m.range());
        let secret = caps.name("secret").map_or(whole.clone(), |m| m.range());
        if let Some(valid) = rule.validate {
            if !valid(text, &text[secret.clone()], secret.clone()) {
                return text[whole].to_owned();
            }
        }
        if text[secret.clone()].starts_with("[MASKED:") {
            return text[whole].to_owned();
        }
        changed += 1;
        let keep = rule.keep_prefix.map_or(0, |k| k(&text[secret.clone()]));
        format!(
            "{}{}{}{}",
            &text[whole.start..secret.start],
            &text[secret.start..secret.start + keep],
            rule.replacement,
            &text[secret.end..whole.end]
        )
    });
    if changed == 0 {
        return None;
    }
    rule.masked.fetch_add(changed, Ordering::Relaxed);
    Some(replaced.into_owned())
}

impl Stage for Masker {
    fn process(&self, record: &mut crate::model::Interaction) -> usize {
        self.mask_record(record)
    }
}

#[cfg(test)]
mod tests;
