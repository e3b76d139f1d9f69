//! The masking corpus (`tests/data/mask/`): realistic secrets that must all be masked,
//! look-alikes that must all be left alone, and the rules' details.

use super::rules::is_secret_key;
use super::*;

/// Samples of a corpus file: (header, text).
fn corpus(name: &str) -> Vec<(String, String)> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/mask").join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    text.split("\n---\n")
        .filter(|s| !s.trim().is_empty())
        .map(|sample| {
            let sample = sample.trim_start_matches("---\n");
            let (header, body) = sample.split_once('\n').unwrap_or((sample, ""));
            (header.trim().to_owned(), body.to_owned())
        })
        .collect()
}

/// `# rule: NAME | secret: VALUE` → (NAME, VALUE).
fn secret_header(header: &str) -> (String, String) {
    let rest = header.trim_start_matches('#').trim();
    let (rule, secret) = rest.split_once('|').unwrap_or_else(|| panic!("bad header `{header}`"));
    let rule = rule.trim().trim_start_matches("rule:").trim().to_owned();
    let secret = secret.trim().trim_start_matches("secret:").trim().to_owned();
    (rule, secret)
}

const PII_RULES: [&str; 5] = ["email", "phone", "cn_id", "ipv4", "ipv6"];

#[test]
fn every_secret_of_the_corpus_is_masked() {
    let masker = Masker::new(true, &[]).unwrap();
    let samples = corpus("secrets.txt");
    let mut missed = Vec::new();
    let mut per_rule = std::collections::BTreeMap::<String, usize>::new();
    for (header, text) in &samples {
        let (rule, secret) = secret_header(header);
        *per_rule.entry(rule.clone()).or_default() += 1;
        let masked = masker.mask(text);
        if masked.contains(secret.as_str()) || !masked.contains("[MASKED:") {
            missed.push(format!("{rule}: `{secret}` survives in:\n{masked}"));
        }
    }
    let secrets =
        samples.len() - per_rule.iter().filter(|(r, _)| PII_RULES.contains(&r.as_str())).map(|(_, n)| n).sum::<usize>();
    eprintln!(
        "masking corpus: {} samples ({secrets} secrets, {} PII), per rule {per_rule:?}",
        samples.len(),
        samples.len() - secrets
    );
    assert!(samples.len() >= 60, "the corpus holds {} samples", samples.len());
    assert!(missed.is_empty(), "{} of {} not masked:\n{}", missed.len(), samples.len(), missed.join("\n---\n"));
}

#[test]
fn look_alikes_are_left_alone() {
    let masker = Masker::new(false, &[]).unwrap();
    let samples = corpus("lookalikes.txt");
    let changed: Vec<String> = samples
        .iter()
        .filter_map(|(header, text)| match masker.mask(text) {
            Cow::Borrowed(_) => None,
            Cow::Owned(masked) => Some(format!("{header}:\n{text}\n→\n{masked}")),
        })
        .collect();
    eprintln!("look-alike corpus: {} samples, {} changed", samples.len(), changed.len());
    assert!(samples.len() >= 30, "the corpus holds {} samples", samples.len());
    assert!(changed.is_empty(), "{} of {} changed:\n{}", changed.len(), samples.len(), changed.join("\n---\n"));
}

#[test]
fn the_label_stays_and_the_marker_names_the_rule() {
    let masker = Masker::new(false, &[]).unwrap();
    assert_eq!(masker.mask("DB_PASSWORD=hunter2hunter2"), "DB_PASSWORD=[MASKED:password_pair]");
    assert_eq!(
        masker.mask("curl -H 'Authorization: Bearer abcdefghijklmnop1234'"),
        "curl -H 'Authorization: Bearer [MASKED:bearer_token]'"
    );
    assert_eq!(masker.mask("postgres://app:s3cr3t@db:5432/x"), "postgres://app:[MASKED:url_password]@db:5432/x");
    assert!(matches!(masker.mask("nothing to see here"), Cow::Borrowed(_)));
    assert!(masker.counts()["password_pair"] >= 1);
}

#[test]
fn pii_is_masked_only_when_asked() {
    let text = "联系 alice@example.com 或 13812345678, id 11010519491231002X, from 10.1.2.3";
    let without = Masker::new(false, &[]).unwrap();
    assert_eq!(without.mask(text), text);
    let with = Masker::new(true, &[]).unwrap();
    let masked = with.mask(text);
    assert!(!masked.contains("alice@example.com") && !masked.contains("13812345678"), "{masked}");
    assert!(!masked.contains("11010519491231002X"), "{masked}");
    assert!(masked.contains("10.1.[MASKED:ipv4]"), "{masked}");
    // 18 digits with a wrong check character are an order number, not an ID.
    assert_eq!(with.mask("order 110105194912310021"), "order 110105194912310021");
}

#[test]
fn custom_rules_apply_and_bad_patterns_are_named() {
    let custom = [CustomRule { name: "ticket".into(), regex: r"TKT-(?P<secret>\d{6})".into(), replacement: None }];
    let masker = Masker::new(false, &custom).unwrap();
    assert_eq!(masker.mask("see TKT-123456"), "see TKT-[MASKED:ticket]");
    let bad = [CustomRule { name: "broken".into(), regex: "(".into(), replacement: None }];
    let err = Masker::new(false, &bad).unwrap_err();
    assert!(err.to_string().contains("`broken`"), "{err}");
}

#[test]
fn a_record_is_masked_in_every_field_and_attributes_by_key() {
    use crate::model::{Interaction, Thought, ToolCall};
    let masker = Masker::new(false, &[]).unwrap();
    let key = "sk-proj-Zx81kQm2Lr7TnB4cVd9WyP3s";
    let mut r = Interaction::new(format!("my key is {key}"));
    r.final_answer = Some(format!("do not share {key}"));
    r.error = Some(format!("401 for {key}"));
    r.thoughts.push(Thought { content: format!("the user pasted {key}"), sequence_number: 1 });
    r.tool_calls.push(ToolCall {
        tool_name: "shell".into(),
        tool_input: format!("curl -H 'Authorization: Bearer {key}'"),
        tool_observation: Some(format!("echo {key}")),
        sequence_number: 1,
        duration_ms: None,
        thought_sequence_number: None,
        error: Some(format!("bad {key}")),
        ..ToolCall::new("", "")
    });
    r.attributes.insert("apiKey".into(), serde_json::json!("plain-looking-value"));
    r.attributes.insert("nested".into(), serde_json::json!({"list": [format!("x {key}")], "client_secret": "abc"}));
    r.attributes.insert("commit".into(), serde_json::json!("9fceb02d0ae598e95dc970b74767f19372d61af8"));
    let changed = masker.mask_record(&mut r);
    let json = serde_json::to_string(&r).unwrap();
    assert!(!json.contains(key) && !json.contains("plain-looking-value") && !json.contains("\"abc\""), "{json}");
    assert!(json.contains("9fceb02d0ae598e95dc970b74767f19372d61af8"), "a git SHA is not a secret: {json}");
    assert_eq!(changed, 10, "{json}");
    assert!(!is_secret_key("secretName") && is_secret_key("DB_PASSWORD") && is_secret_key("apiKey"));
}
