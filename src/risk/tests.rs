use super::*;
use crate::config::{RiskConfig, RiskRuleConfig};

/// The corpus: (expected level, tool, input, expected rule).
fn corpus() -> Vec<(RiskLevel, String, String, Option<String>)> {
    include_str!("../../tests/data/risk/corpus.tsv")
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .map(|line| {
            let cols: Vec<&str> = line.split('\t').collect();
            assert_eq!(cols.len(), 4, "corpus line needs 4 tab-separated columns: {line}");
            let level = RiskLevel::parse(cols[0]).unwrap_or_else(|| panic!("bad level in: {line}"));
            let input = cols[2].replace("\\n", "\n").replace("\\t", "\t");
            let rule = (cols[3] != "-").then(|| cols[3].to_owned());
            (level, cols[1].to_owned(), input, rule)
        })
        .collect()
}

/// Every entry gets its expected level and rule; precision and recall of "flagged at
/// medium or above" are printed (`cargo test --lib risk:: -- --nocapture`).
#[test]
fn corpus_levels_precision_and_recall() {
    let classifier = RiskClassifier::new(&RiskConfig::default()).unwrap();
    let corpus = corpus();
    let harmless = corpus.iter().filter(|(l, ..)| *l <= RiskLevel::Low).count();
    assert!(corpus.len() >= 80 && harmless >= 30, "{} entries, {harmless} none/low", corpus.len());
    let (mut tp, mut fp, mut fn_, mut exact) = (0, 0, 0, 0);
    let mut wrong = Vec::new();
    for (expected, tool, input, rule) in &corpus {
        let verdict = classifier.classify(tool, input);
        let (want, got) = (*expected >= RiskLevel::Medium, verdict.level >= RiskLevel::Medium);
        match (want, got) {
            (true, true) => tp += 1,
            (false, true) => fp += 1,
            (true, false) => fn_ += 1,
            (false, false) => {}
        }
        if verdict.level == *expected && verdict.rule == *rule {
            exact += 1;
        } else {
            wrong.push(format!(
                "{tool}: {input}\n    expected {expected} {rule:?}, got {} {:?}\n    {:?}",
                verdict.level,
                verdict.rule,
                RiskClassifier::findings(tool, input)
            ));
        }
    }
    let precision = f64::from(tp) / f64::from(tp + fp).max(1.0);
    let recall = f64::from(tp) / f64::from(tp + fn_).max(1.0);
    println!(
        "risk corpus: {} commands ({harmless} none/low), exact level and rule {exact}/{}; \
         flagged (>= medium): precision {precision:.3}, recall {recall:.3} (tp {tp}, fp {fp}, fn {fn_})",
        corpus.len(),
        corpus.len()
    );
    assert!(wrong.is_empty(), "{} misclassified:\n{}", wrong.len(), wrong.join("\n"));
}

#[test]
fn custom_rules_and_overrides_apply() {
    let config = RiskConfig {
        enabled: true,
        rules: vec![RiskRuleConfig {
            name: "prod_db_touch".into(),
            level: RiskLevel::High,
            tool: Some("^(shell|bash)$".into()),
            pattern: r"\bprod-db\b".into(),
        }],
        overrides: [("kubectl_exec".to_owned(), RiskLevel::Low)].into_iter().collect(),
    };
    let classifier = RiskClassifier::new(&config).unwrap();
    let verdict = classifier.classify("shell", "pg_dump -h prod-db app");
    assert_eq!((verdict.level, verdict.rule.as_deref()), (RiskLevel::High, Some("prod_db_touch")));
    // The tool regex limits the rule.
    assert_eq!(classifier.classify("kubectl", "get pods -l db=prod-db").level, RiskLevel::None);
    let verdict = classifier.classify("kubectl", "kubectl exec web-0 -- ls");
    assert_eq!((verdict.level, verdict.rule.as_deref()), (RiskLevel::Low, Some("kubectl_exec")));

    let unknown = RiskConfig { overrides: [("no_such_rule".to_owned(), RiskLevel::Low)].into(), ..config.clone() };
    let err = RiskClassifier::new(&unknown).unwrap_err().to_string();
    assert!(err.contains("no_such_rule"), "{err}");
    let mut bad = config;
    bad.rules[0].pattern = "(".into();
    let err = RiskClassifier::new(&bad).unwrap_err().to_string();
    assert!(err.contains("prod_db_touch"), "{err}");
}

#[test]
fn the_stage_sets_calls_and_roll_up() {
    let classifier = RiskClassifier::new(&RiskConfig::default()).unwrap();
    let mut record = Interaction::new("why is checkout down?");
    record.tool_calls.push(ToolCall::new("kubectl", "kubectl get pods -n shop"));
    record.tool_calls.push(ToolCall::new("kubectl", "kubectl delete pod checkout-0 -n shop"));
    let mut forged = ToolCall::new("shell", "rm -rf /");
    forged.risk_level = RiskLevel::None;
    record.tool_calls.push(forged);
    classifier.process(&mut record);
    let levels: Vec<RiskLevel> = record.tool_calls.iter().map(|c| c.risk_level).collect();
    assert_eq!(levels, vec![RiskLevel::None, RiskLevel::High, RiskLevel::Critical]);
    assert_eq!(record.tool_calls[0].risk_rule, None);
    assert_eq!((record.risk_level, record.risk_flagged), (RiskLevel::Critical, 2));
}

#[test]
fn every_rule_name_is_unique_and_levels_parse() {
    let mut names: Vec<&str> = BUILTIN_RULES.iter().map(|r| r.name).collect();
    names.sort_unstable();
    names.dedup();
    assert_eq!(names.len(), BUILTIN_RULES.len());
    for level in RiskLevel::ALL {
        assert_eq!(RiskLevel::parse(level.as_str()), Some(level));
        assert_eq!(RiskLevel::from_rank(level.rank().into()), Some(level));
    }
}
