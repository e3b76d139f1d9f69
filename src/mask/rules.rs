//! The built-in rules. Each names the secret it finds; where a label tells what a value
//! is (`password=`, `Authorization: Bearer`), only the value (the `secret` group) is
//! replaced and the label stays.

/// A check of a match beyond its pattern: (the whole text, the secret, its range).
pub type Validator = fn(&str, &str, std::ops::Range<usize>) -> bool;

/// A rule before compilation.
#[derive(Debug, Clone)]
pub struct RuleSpec {
    /// Name in the marker and the counts.
    pub name: String,
    /// The pattern; a group named `secret` narrows what is replaced.
    pub pattern: String,
    /// Replacement text; default: the marker naming the rule.
    pub replacement: Option<String>,
    /// A personal-data rule (off unless asked for).
    pub pii: bool,
    /// Extra check of a match: (whole text, secret, its range).
    pub validate: Option<Validator>,
    /// Characters of the secret to keep in front of the marker (address truncation).
    pub keep_prefix: Option<fn(&str) -> usize>,
}

fn spec(name: &str, pattern: &str) -> RuleSpec {
    RuleSpec {
        name: name.into(),
        pattern: pattern.into(),
        replacement: None,
        pii: false,
        validate: None,
        keep_prefix: None,
    }
}

fn pii(name: &str, pattern: &str) -> RuleSpec {
    RuleSpec { pii: true, ..spec(name, pattern) }
}

/// Keys whose value is a credential, in text, env dumps, JSON and YAML.
const SECRET_KEYS: &str = r"(?:pass(?:word|wd|phrase)?|pwd|secret(?:[_-]?key)?|client[_-]?secret|token|access[_-]?token|refresh[_-]?token|auth[_-]?token|api[_-]?key|apikey|access[_-]?key|private[_-]?key|credentials?)";

static SECRET_KEY: std::sync::LazyLock<regex::Regex> = std::sync::LazyLock::new(|| {
    regex::Regex::new(&format!(r"(?i)^(?:.*[_\-.])?{SECRET_KEYS}$")).expect("static pattern")
});

/// True when a JSON key or variable name holds a credential (`password`,
/// `DB_PASSWORD`, `client_secret`, `apiKey`).
pub fn is_secret_key(key: &str) -> bool {
    SECRET_KEY.is_match(key)
}

/// Every built-in rule, secrets first (more specific before more general).
pub fn builtin_rules() -> Vec<RuleSpec> {
    vec![
        spec(
            "private_key",
            r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----[\s\S]*?-----END (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----",
        ),
        spec("anthropic_key", r"\bsk-ant-[A-Za-z0-9_\-]{20,}"),
        spec("openai_key", r"\bsk-(?:proj-|svcacct-|admin-)?[A-Za-z0-9_\-]{20,}"),
        spec("jwt", r"\beyJ[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]{8,}"),
        RuleSpec {
            validate: Some(looks_generated),
            ..spec("bearer_token", r"(?i)\bbearer[ \t]+(?P<secret>[A-Za-z0-9\-._~+/]{12,}=*)")
        },
        spec(
            "bearer_token",
            r#"(?i)\bauthorization["']?[ \t]*[:=][ \t]*["']?(?:basic[ \t]+|token[ \t]+)?(?P<secret>[A-Za-z0-9\-._~+/]{8,}=*)"#,
        ),
        spec("aws_access_key_id", r"\b(?:AKIA|ASIA|AGPA|AIDA|AROA|ANPA|ANVA|AIPA)[A-Z0-9]{16}\b"),
        spec(
            "aws_secret_key",
            r#"(?i)aws_?secret_?(?:access_?)?key["']?[ \t]*[:=][ \t]*["']?(?P<secret>[A-Za-z0-9/+=]{40})"#,
        ),
        spec("github_token", r"\b(?:gh[pousr]_[A-Za-z0-9]{30,}|github_pat_[A-Za-z0-9_]{30,})"),
        spec("gitlab_token", r"\bglpat-[A-Za-z0-9_\-]{20,}"),
        spec("slack_token", r"\b(?:xox[abposr]-[A-Za-z0-9\-]{10,}|xapp-[A-Za-z0-9\-]{10,})"),
        spec("google_api_key", r"\bAIza[0-9A-Za-z_\-]{35}"),
        spec("url_password", r"(?i)\b[a-z][a-z0-9+.\-]*://[^\s:/@]+:(?P<secret>[^\s@/]+)@"),
        spec(
            "password_pair",
            &format!(
                r#"(?i)(?:\b|_){SECRET_KEYS}(?:["'][ \t]*[:=][ \t]*["']?|[ \t]*=[ \t]*["']?|[ \t]*:[ \t]+["']?)(?P<secret>[^\s"',;}}&<>]{{3,}})"#
            ),
        ),
        spec("password_pair", r"(?:密码|口令|令牌|密钥)[ \t]*[:：=][ \t]*(?P<secret>[^\s，。,;；]{3,})"),
        // After the pairs: a bare `password=…` is a pair; this catches what they leave,
        // the `Pwd=…;` of ADO.NET/ODBC strings.
        spec("connection_string", r#"(?i)(?:^|[;\s"'])(?:password|pwd)[ \t]*=[ \t]*(?P<secret>[^;"'\s]+)"#),
        pii("email", r"\b[A-Za-z0-9._%+\-]+@[A-Za-z0-9\-]+(?:\.[A-Za-z0-9\-]+)*\.[A-Za-z]{2,}\b"),
        pii("phone", r"\+\d{1,3}[ \-]?\(?\d{2,4}\)?[ \-]?\d{3,4}[ \-]?\d{3,4}"),
        RuleSpec { validate: Some(not_glued_to_digits), ..pii("phone", r"1[3-9]\d{9}") },
        RuleSpec { validate: Some(valid_cn_id), ..pii("cn_id", r"\d{17}[\dXx]") },
        RuleSpec {
            keep_prefix: Some(ipv4_prefix),
            validate: Some(valid_ipv4),
            ..pii("ipv4", r"\b(?:\d{1,3}\.){3}\d{1,3}\b")
        },
        RuleSpec {
            keep_prefix: Some(ipv6_prefix),
            validate: Some(valid_ipv6),
            ..pii("ipv6", r"[0-9A-Fa-f]{0,4}(?::[0-9A-Fa-f]{0,4}){2,7}")
        },
    ]
}

/// A credential, not a word: it holds a digit or a symbol (`Bearer authentication` in
/// prose is not a token).
fn looks_generated(_text: &str, secret: &str, _range: std::ops::Range<usize>) -> bool {
    secret.chars().any(|c| c.is_ascii_digit() || "-._~+/=".contains(c))
}

/// True when the match is not part of a longer run of digits (the regex crate has no
/// look-around, and `\b` does not separate a Chinese character from a digit).
fn not_glued_to_digits(text: &str, _secret: &str, range: std::ops::Range<usize>) -> bool {
    let before = text[..range.start].chars().next_back();
    let after = text[range.end..].chars().next();
    !before.is_some_and(|c| c.is_ascii_digit()) && !after.is_some_and(|c| c.is_ascii_digit())
}

/// An 18-character Chinese resident ID: not inside a longer number, and its check
/// character (ISO 7064 MOD 11-2) right, so order numbers of 18 digits are left alone.
fn valid_cn_id(text: &str, id: &str, range: std::ops::Range<usize>) -> bool {
    const WEIGHTS: [u32; 17] = [7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2];
    const CHECK: &[u8; 11] = b"10X98765432";
    if !not_glued_to_digits(text, id, range) {
        return false;
    }
    let bytes = id.as_bytes();
    let sum: u32 = bytes[..17].iter().zip(WEIGHTS).map(|(b, w)| u32::from(b - b'0') * w).sum();
    bytes[17].to_ascii_uppercase() == CHECK[(sum % 11) as usize]
}

fn valid_ipv4(_text: &str, ip: &str, _range: std::ops::Range<usize>) -> bool {
    ip.parse::<std::net::Ipv4Addr>().is_ok()
}

/// Only real addresses: the candidate pattern also finds clock times and MAC addresses,
/// which do not parse.
fn valid_ipv6(text: &str, ip: &str, range: std::ops::Range<usize>) -> bool {
    let glued = |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric());
    !glued(text[..range.start].chars().next_back())
        && !glued(text[range.end..].chars().next())
        && ip.contains("::") | (ip.matches(':').count() == 7)
        && ip.parse::<std::net::Ipv6Addr>().is_ok()
}

/// Keeps the first two octets: `10.1.[MASKED:ipv4]`, enough to tell networks apart.
fn ipv4_prefix(ip: &str) -> usize {
    ip.match_indices('.').nth(1).map_or(0, |(i, _)| i + 1)
}

/// Keeps the first three groups (the routing prefix).
fn ipv6_prefix(ip: &str) -> usize {
    ip.match_indices(':').nth(2).map_or(0, |(i, _)| i + 1)
}
