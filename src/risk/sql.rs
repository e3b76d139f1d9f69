//! SQL: statements split at `;`, comments and string literals removed, so a `WHERE`
//! inside a string or a `DROP` in a comment counts for nothing, then each statement
//! judged by its leading keywords and whether it has a (non-trivial) `WHERE`.

/// The rules the statements of `sql` trigger, one per statement that triggers one.
pub(crate) fn analyze(sql: &str) -> Vec<&'static str> {
    statements(sql).iter().filter_map(|words| statement_rule(words)).collect()
}

/// True when `word` starts a statement this module judges (for SQL written as shell
/// lines, e.g. a here-document fed to `psql`).
pub(crate) fn is_statement_keyword(word: &str) -> bool {
    matches!(
        word.to_ascii_uppercase().as_str(),
        "DROP" | "TRUNCATE" | "DELETE" | "UPDATE" | "ALTER" | "GRANT" | "REVOKE" | "INSERT"
    )
}

/// Each statement as its words (upper-cased keywords and identifiers, literals gone).
fn statements(sql: &str) -> Vec<Vec<String>> {
    let chars: Vec<char> = sql.chars().collect();
    let mut out = Vec::new();
    let mut words: Vec<String> = Vec::new();
    let mut word = String::new();
    let mut i = 0;
    let end_word = |word: &mut String, words: &mut Vec<String>| {
        if !word.is_empty() {
            words.push(std::mem::take(word).to_ascii_uppercase());
        }
    };
    while i < chars.len() {
        let c = chars[i];
        let next = chars.get(i + 1).copied();
        match c {
            '-' if next == Some('-') => {
                end_word(&mut word, &mut words);
                while i < chars.len() && chars[i] != '\n' {
                    i += 1;
                }
            }
            '/' if next == Some('*') => {
                end_word(&mut word, &mut words);
                i += 2;
                while i + 1 < chars.len() && !(chars[i] == '*' && chars[i + 1] == '/') {
                    i += 1;
                }
                i += 2;
                continue;
            }
            '\'' => {
                end_word(&mut word, &mut words);
                i += 1;
                while i < chars.len() {
                    if chars[i] == '\'' {
                        if chars.get(i + 1) == Some(&'\'') {
                            i += 1;
                        } else {
                            break;
                        }
                    }
                    i += 1;
                }
                words.push("'?'".into());
            }
            ';' => {
                end_word(&mut word, &mut words);
                if !words.is_empty() {
                    out.push(std::mem::take(&mut words));
                }
            }
            '=' | '(' | ')' | ',' | '<' | '>' => {
                end_word(&mut word, &mut words);
                words.push(c.to_string());
            }
            c if c.is_whitespace() => end_word(&mut word, &mut words),
            c => word.push(c),
        }
        i += 1;
    }
    end_word(&mut word, &mut words);
    if !words.is_empty() {
        out.push(words);
    }
    out
}

fn statement_rule(words: &[String]) -> Option<&'static str> {
    let w = |i: usize| words.get(i).map(String::as_str).unwrap_or_default();
    let has = |k: &str| words.iter().any(|x| x == k);
    let mut first = w(0);
    // `WITH … DELETE/UPDATE …`, `EXPLAIN ANALYZE DELETE …`: the statement that runs.
    if first == "WITH" || (first == "EXPLAIN" && has("ANALYZE")) {
        first = words.iter().map(String::as_str).find(|x| matches!(*x, "DELETE" | "UPDATE" | "INSERT"))?;
    }
    match first {
        "DROP" if matches!(w(1), "DATABASE" | "SCHEMA") => Some("sql_drop_database"),
        "DROP" if matches!(w(1), "ROLE" | "USER" | "OWNED") => Some("sql_privilege_change"),
        "DROP" => Some("sql_drop"),
        "TRUNCATE" => Some("sql_truncate"),
        "DELETE" if has_real_where(words) => Some("sql_delete"),
        "DELETE" => Some("sql_delete_without_where"),
        "UPDATE" if has_real_where(words) => Some("sql_update"),
        "UPDATE" => Some("sql_update_without_where"),
        "GRANT" | "REVOKE" => Some("sql_privilege_change"),
        "CREATE" | "ALTER" if matches!(w(1), "ROLE" | "USER") => Some("sql_privilege_change"),
        "ALTER" if has("DROP") => Some("sql_drop"),
        "ALTER" => Some("sql_alter"),
        "INSERT" | "MERGE" | "UPSERT" | "REPLACE" => Some("sql_write"),
        "COPY" if has("FROM") => Some("sql_write"),
        "CREATE" => Some("sql_ddl"),
        "VACUUM" | "ANALYZE" | "REINDEX" | "CLUSTER" | "OPTIMIZE" => Some("sql_maintenance"),
        "KILL" => Some("sql_kill_session"),
        "SELECT" if words.iter().any(|x| x.starts_with("PG_TERMINATE_BACKEND")) => Some("sql_kill_session"),
        _ => None,
    }
}

/// A `WHERE` that filters: not `WHERE 1=1`, `WHERE TRUE` or `WHERE 1`.
fn has_real_where(words: &[String]) -> bool {
    let Some(at) = words.iter().position(|w| w == "WHERE") else {
        return false;
    };
    let rest: Vec<&str> = words[at + 1..].iter().map(String::as_str).collect();
    let trivial = match rest.as_slice() {
        ["TRUE"] | ["1"] => true,
        [a, "=", b] => a == b,
        _ => false,
    };
    !trivial
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literals_and_comments_do_not_count() {
        assert_eq!(analyze("SELECT 'DROP TABLE x' -- DELETE FROM y"), Vec::<&str>::new());
        assert_eq!(analyze("DELETE FROM t /* WHERE */"), vec!["sql_delete_without_where"]);
        assert_eq!(analyze("delete from t where note = 'it''s'"), vec!["sql_delete"]);
        assert_eq!(analyze("UPDATE t SET a = 1 WHERE 1 = 1"), vec!["sql_update_without_where"]);
        assert_eq!(analyze("BEGIN; DROP TABLE a; COMMIT"), vec!["sql_drop"]);
    }
}
