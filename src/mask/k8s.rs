//! Kubernetes Secret manifests (`kubectl get secret -o yaml|json`): every value under
//! `data:` and `stringData:` is a secret, whatever its key is called, so they are masked
//! by the manifest's structure rather than by what the values look like. Only text that
//! holds a Secret is touched: a ConfigMap's `data:` is configuration, left readable.

use std::fmt::Write as _;
use std::sync::LazyLock;

use regex::Regex;

/// The rule name in markers and counts.
pub const RULE: &str = "k8s_secret";

static KIND_SECRET: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r#"(?m)(?:^\s*kind:\s*Secret\s*$|"kind"\s*:\s*"Secret")"#).expect("static pattern"));
static YAML_BLOCK: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"^(\s*)(?:data|stringData):\s*$").expect("static pattern"));
static YAML_ENTRY: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"^(\s*[^\s:#][^:]*:\s*)(\S.*)$").expect("static pattern"));
static JSON_BLOCK: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r#""(?:data|stringData)"\s*:\s*\{"#).expect("static pattern"));
static JSON_ENTRY: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r#"("[^"\\]*"\s*:\s*")((?:[^"\\]|\\.)+)(")"#).expect("static pattern"));

/// The text with every Secret value masked, and how many; `None` if there was none.
pub fn mask_secret_values(text: &str) -> Option<(String, u64)> {
    if !text.contains("Secret") || !KIND_SECRET.is_match(text) {
        return None;
    }
    let (text, yaml) = mask_yaml(text);
    let (text, json) = mask_json(&text);
    (yaml + json > 0).then_some((text, yaml + json))
}

fn indent(line: &str) -> usize {
    line.len() - line.trim_start().len()
}

fn mask_yaml(text: &str) -> (String, u64) {
    let marker = super::marker(RULE);
    let mut out = String::with_capacity(text.len());
    let mut masked = 0;
    // The indentation of the `data:` line while inside its block.
    let mut block: Option<usize> = None;
    // Inside a multi-line value (`key: |`): its key's indentation.
    let mut multiline: Option<usize> = None;
    for line in text.split_inclusive('\n') {
        let body = line.trim_end_matches(['\n', '\r']);
        let ending = &line[body.len()..];
        let depth = indent(body);
        if let Some(key_depth) = multiline {
            if body.trim().is_empty() || depth > key_depth {
                if !body.trim().is_empty() {
                    let _ = write!(out, "{}{marker}{ending}", &body[..depth]);
                    masked += 1;
                } else {
                    out.push_str(line);
                }
                continue;
            }
            multiline = None;
        }
        if let Some(block_depth) = block {
            if !body.trim().is_empty() && depth <= block_depth {
                block = None;
            } else if let Some(caps) = YAML_ENTRY.captures(body) {
                let value = caps.get(2).map_or("", |m| m.as_str());
                let key = caps.get(1).map_or("", |m| m.as_str());
                if value.starts_with('|') || value.starts_with('>') {
                    multiline = Some(depth);
                    out.push_str(line);
                } else if value.starts_with("[MASKED:") {
                    out.push_str(line);
                } else {
                    let _ = write!(out, "{key}{marker}{ending}");
                    masked += 1;
                }
                continue;
            }
        }
        if let Some(caps) = YAML_BLOCK.captures(body) {
            block = Some(caps.get(1).map_or(0, |m| m.as_str().len()));
        }
        out.push_str(line);
    }
    (out, masked)
}

fn mask_json(text: &str) -> (String, u64) {
    let marker = super::marker(RULE);
    let mut out = String::with_capacity(text.len());
    let mut masked = 0;
    let mut rest = text;
    while let Some(start) = JSON_BLOCK.find(rest) {
        out.push_str(&rest[..start.end()]);
        rest = &rest[start.end()..];
        // Secret values are base64 or plain strings: the block ends at the first `}`
        // outside a string.
        let end = block_end(rest);
        let block = &rest[..end];
        let replaced = JSON_ENTRY.replace_all(block, |caps: &regex::Captures<'_>| {
            masked += 1;
            format!("{}{marker}{}", &caps[1], &caps[3])
        });
        out.push_str(&replaced);
        rest = &rest[end..];
    }
    out.push_str(rest);
    (out, masked)
}

/// Where the object that starts at `text` ends (its closing brace), or the text's end.
fn block_end(text: &str) -> usize {
    let mut in_string = false;
    let mut escaped = false;
    for (i, c) in text.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if in_string => escaped = true,
            '"' => in_string = !in_string,
            '}' if !in_string => return i,
            _ => {}
        }
    }
    text.len()
}
