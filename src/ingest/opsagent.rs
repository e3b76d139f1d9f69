//! One OpsAgent HTTP exchange (request and response as the auditing proxy saw them) →
//! an [`Interaction`], as `/work/shared/opsagent-api.md` describes the agent's API.
//!
//! Pure: plain path, query string, body bytes and status in, a record out; the proxy
//! adds what only it knows (session, user, client, timings).
//!
//! | endpoint | question | model_name | other |
//! |---|---|---|---|
//! | `/api/execute` | `instructions` | `currentModel` | `provider`, `base_url` ← `baseUrl`, `cluster` |
//! | `/api/diagnose` | `diagnose {namespace}/{name}` | query `model` (default `gpt-4o`) | query `cluster` (default `default`) |
//! | `/api/analyze` | `analyze {resource}` | query `model` (default `gpt-4o`) | query `cluster` (default `default`) |
//! | any other audited path | `instructions`, else `question` | `currentModel`, else query `model` | as `/api/execute` |
//!
//! The response: `message` → `final_answer`; `status` (`success`, `processing`,
//! `error`, kept as `attributes.agent_status`) → the record's status (`processing` counts
//! as success: the agent answered); the thought of each `tools_history[i]`, then the
//! final `thought` (unless it repeats the last one) → thoughts; `tools_history[i]` →
//! tool calls in order, each linked to its thought. A non-2xx reply is an error whose
//! text is the body's `error` (or `message`, or the body itself). A body that is not
//! JSON, or was cut at `audit.limits.max_body_bytes`, still gives a record, marked
//! `attributes.request_body` / `attributes.response_body` = `truncated` or `not_json`.

use serde_json::{Map, Value};

use uuid::Uuid;

use crate::model::{Interaction, Status, Thought, ToolCall};

/// The model the agent uses for `/api/diagnose` and `/api/analyze` when none is given.
pub const DEFAULT_MODEL: &str = "gpt-4o";
/// The cluster the agent uses for `/api/diagnose` and `/api/analyze` when none is given.
pub const DEFAULT_CLUSTER: &str = "default";
/// Longest error text taken from a non-JSON error body, in bytes.
const MAX_RAW_ERROR_BYTES: usize = 4096;

/// A body as captured: its first bytes, and whether there were more.
#[derive(Debug, Clone, Copy, Default)]
pub struct Captured<'a> {
    /// The bytes kept (at most `audit.limits.max_body_bytes`).
    pub bytes: &'a [u8],
    /// True when the body was longer than what was kept.
    pub truncated: bool,
}

impl<'a> Captured<'a> {
    /// A whole body.
    pub fn whole(bytes: &'a [u8]) -> Self {
        Captured { bytes, truncated: false }
    }
}

/// How the exchange ended.
#[derive(Debug, Clone, Copy)]
pub enum Ending<'a> {
    /// The agent answered and the whole answer went through.
    Answered {
        /// HTTP status.
        status: u16,
        /// The response body.
        body: Captured<'a>,
    },
    /// The answer started but did not complete: the client went away (`cancelled`) or
    /// the agent's body failed (`error`).
    Interrupted {
        /// HTTP status of the answer's head.
        status: u16,
        /// What of the body went through.
        body: Captured<'a>,
        /// True when the client went away; false when the agent's side failed.
        client_gone: bool,
        /// What happened.
        reason: &'a str,
    },
    /// The client went away before the agent answered.
    ClientGone,
    /// The agent could not be reached, or failed before its answer's head; answered
    /// with this status (502).
    Unreachable {
        /// The status the client was answered with.
        status: u16,
        /// Why.
        reason: &'a str,
    },
    /// The agent did not answer in time; answered with this status (504).
    TimedOut {
        /// The status the client was answered with.
        status: u16,
        /// What was waited for, and how long.
        reason: &'a str,
    },
}

/// One request to an audited endpoint and how it ended.
#[derive(Debug, Clone, Copy)]
pub struct Exchange<'a> {
    /// The request path, e.g. `/api/execute`.
    pub path: &'a str,
    /// The query string as the client sent it (without `?`), if any.
    pub query: Option<&'a str>,
    /// The request body.
    pub request: Captured<'a>,
    /// How it ended.
    pub ending: Ending<'a>,
}

/// Maps an exchange to a record: endpoint, question, model, provider, base URL,
/// cluster, answer, status, error, HTTP status, thoughts and tool calls. Ids, time,
/// user and client are left for the caller.
pub fn map_exchange(exchange: &Exchange<'_>) -> Interaction {
    let query = parse_query(exchange.query);
    let mut attributes = Map::new();
    let request = parse_body(exchange.request, "request_body", &mut attributes);
    let mut record = Interaction::new(String::new());
    map_request(exchange.path, &query, request.as_ref(), &mut record);
    if record.question.is_empty() {
        // The question is the one field a record needs; say why it is not known.
        record.question = format!("(question not readable: {} request body)", describe(exchange.request));
    }
    record.endpoint = Some(exchange.path.to_string());
    match exchange.ending {
        Ending::Answered { status, body } => {
            record.http_status = Some(i32::from(status));
            let response = parse_body(body, "response_body", &mut attributes);
            map_response(status, body, response.as_ref(), &mut record, &mut attributes);
        }
        Ending::Interrupted { status, body, client_gone, reason } => {
            record.http_status = Some(i32::from(status));
            let response = parse_body(body, "response_body", &mut attributes);
            map_response(status, body, response.as_ref(), &mut record, &mut attributes);
            record.status = if client_gone { Status::Cancelled } else { Status::Error };
            record.error = Some(reason.to_string());
        }
        Ending::ClientGone => {
            record.status = Status::Cancelled;
            record.error = Some("the client went away before the agent answered".into());
        }
        Ending::Unreachable { status, reason } => {
            record.status = Status::Error;
            record.http_status = Some(i32::from(status));
            record.error = Some(reason.to_string());
        }
        Ending::TimedOut { status, reason } => {
            record.status = Status::Timeout;
            record.http_status = Some(i32::from(status));
            record.error = Some(reason.to_string());
        }
    }
    record.attributes.extend(attributes);
    record
}

/// The query string's pairs, decoded.
fn parse_query(query: Option<&str>) -> Vec<(String, String)> {
    query.map(|q| form_urlencoded::parse(q.as_bytes()).into_owned().collect()).unwrap_or_default()
}

fn query_value<'q>(query: &'q [(String, String)], name: &str) -> Option<&'q str> {
    query.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str()).filter(|v| !v.is_empty())
}

/// The body as a JSON object, or `None` with the reason in `attributes[key]`.
fn parse_body(body: Captured<'_>, key: &str, attributes: &mut Map<String, Value>) -> Option<Map<String, Value>> {
    if body.truncated {
        attributes.insert(key.into(), Value::from("truncated"));
        return None;
    }
    if body.bytes.is_empty() {
        return None;
    }
    match serde_json::from_slice::<Value>(body.bytes) {
        Ok(Value::Object(map)) => Some(map),
        _ => {
            attributes.insert(key.into(), Value::from("not_json"));
            None
        }
    }
}

fn describe(body: Captured<'_>) -> &'static str {
    if body.truncated {
        "truncated"
    } else if body.bytes.is_empty() {
        "empty"
    } else {
        "unparsable"
    }
}

/// A string field (numbers and booleans as their text; `null` and empty as absent).
fn text(map: &Map<String, Value>, key: &str) -> Option<String> {
    match map.get(key)? {
        Value::String(s) if s.is_empty() => None,
        Value::String(s) => Some(s.clone()),
        Value::Null => None,
        other => Some(other.to_string()),
    }
}

fn map_request(path: &str, query: &[(String, String)], body: Option<&Map<String, Value>>, record: &mut Interaction) {
    let empty = Map::new();
    let body = body.unwrap_or(&empty);
    match path {
        "/api/diagnose" => {
            if let Some(name) = text(body, "name") {
                let namespace = text(body, "namespace").unwrap_or_else(|| "default".into());
                record.question = format!("diagnose {namespace}/{name}");
            }
            record.model_name = Some(query_value(query, "model").unwrap_or(DEFAULT_MODEL).to_string());
            record.cluster = Some(query_value(query, "cluster").unwrap_or(DEFAULT_CLUSTER).to_string());
        }
        "/api/analyze" => {
            if let Some(resource) = text(body, "resource") {
                record.question = format!("analyze {resource}");
            }
            record.model_name = Some(query_value(query, "model").unwrap_or(DEFAULT_MODEL).to_string());
            record.cluster = Some(query_value(query, "cluster").unwrap_or(DEFAULT_CLUSTER).to_string());
        }
        // `/api/execute`, and any other path configured for auditing: the execute shape,
        // with the query's `model`/`cluster` where the body has none.
        _ => {
            if let Some(question) = text(body, "instructions").or_else(|| text(body, "question")) {
                record.question = question;
            }
            record.model_name = text(body, "currentModel").or_else(|| query_value(query, "model").map(str::to_string));
            record.provider = text(body, "provider");
            record.base_url = text(body, "baseUrl");
            record.cluster = text(body, "cluster").or_else(|| query_value(query, "cluster").map(str::to_string));
        }
    }
}

fn map_response(
    status: u16,
    body: Captured<'_>,
    response: Option<&Map<String, Value>>,
    record: &mut Interaction,
    attributes: &mut Map<String, Value>,
) {
    let empty = Map::new();
    let response = response.unwrap_or(&empty);
    let agent_status = text(response, "status");
    if let Some(s) = &agent_status {
        attributes.insert("agent_status".into(), Value::from(s.as_str()));
    }
    record.final_answer = text(response, "message");
    map_trace(response, record);
    if !(200..300).contains(&status) {
        record.status = Status::Error;
        record.error = Some(
            text(response, "error").or_else(|| record.final_answer.clone()).unwrap_or_else(|| raw_error(body, status)),
        );
    } else if agent_status.as_deref() == Some("error") {
        record.status = Status::Error;
        record.error = text(response, "error").or_else(|| record.final_answer.clone());
    } else {
        record.status = Status::Success;
    }
}

/// The error text of a body that is not a JSON error object: its text, bounded.
fn raw_error(body: Captured<'_>, status: u16) -> String {
    let text = String::from_utf8_lossy(body.bytes);
    let text = text.trim();
    if text.is_empty() {
        return format!("HTTP {status}");
    }
    let mut cut = text.len().min(MAX_RAW_ERROR_BYTES);
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    text[..cut].to_string()
}

/// Thoughts and tool calls from `tools_history` and the final `thought`.
fn map_trace(response: &Map<String, Value>, record: &mut Interaction) {
    if let Some(Value::Array(history)) = response.get("tools_history") {
        for step in history {
            let Value::Object(step) = step else { continue };
            let thought_position = text(step, "thought").map(|t| {
                record.thoughts.push(Thought::new(t));
                record.thoughts.len() as i32
            });
            let Some(name) = text(step, "name") else { continue };
            let mut call = ToolCall::new(name, text(step, "input").unwrap_or_default());
            call.tool_observation = text(step, "observation");
            call.thought_sequence_number = thought_position;
            record.tool_calls.push(call);
        }
    }
    if let Some(thought) = text(response, "thought") {
        // The agent repeats its last step's thought as the final one at times.
        if record.thoughts.last().is_none_or(|last| last.content != thought) {
            record.thoughts.push(Thought::new(thought));
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn answered<'a>(
        path: &'a str,
        query: Option<&'a str>,
        request: &'a [u8],
        status: u16,
        body: &'a [u8],
    ) -> Interaction {
        map_exchange(&Exchange {
            path,
            query,
            request: Captured::whole(request),
            ending: Ending::Answered { status, body: Captured::whole(body) },
        })
    }

    #[test]
    fn execute_with_its_trace_maps_every_field_in_order() {
        let request = json!({"instructions": "why is nginx crashing?", "currentModel": "gpt-4o-mini",
            "provider": "openai", "baseUrl": "https://api.openai.com/v1", "cluster": "prod", "args": ""});
        let response = json!({
            "message": "the image tag does not exist", "status": "success", "thought": "I know the answer",
            "tools_history": [
                {"name": "kubectl", "input": "get pods -n web", "observation": "nginx CrashLoopBackOff", "thought": "look at pods"},
                {"name": "kubectl", "input": "describe pod nginx", "observation": "ErrImagePull", "thought": "describe it"},
                {"name": "trivy", "input": "image nginx:1.99", "observation": "not found"},
            ],
        });
        let r = answered(
            "/api/execute",
            Some("show-thought=true"),
            request.to_string().as_bytes(),
            200,
            response.to_string().as_bytes(),
        );
        assert_eq!(r.question, "why is nginx crashing?");
        assert_eq!(r.endpoint.as_deref(), Some("/api/execute"));
        assert_eq!(r.model_name.as_deref(), Some("gpt-4o-mini"));
        assert_eq!(r.provider.as_deref(), Some("openai"));
        assert_eq!(r.base_url.as_deref(), Some("https://api.openai.com/v1"));
        assert_eq!(r.cluster.as_deref(), Some("prod"));
        assert_eq!(r.final_answer.as_deref(), Some("the image tag does not exist"));
        assert_eq!((r.status, r.http_status, r.error.as_deref()), (Status::Success, Some(200), None));
        let thoughts: Vec<&str> = r.thoughts.iter().map(|t| t.content.as_str()).collect();
        assert_eq!(thoughts, ["look at pods", "describe it", "I know the answer"]);
        let calls: Vec<(&str, &str, Option<&str>, Option<i32>)> = r
            .tool_calls
            .iter()
            .map(|c| {
                (c.tool_name.as_str(), c.tool_input.as_str(), c.tool_observation.as_deref(), c.thought_sequence_number)
            })
            .collect();
        assert_eq!(
            calls,
            [
                ("kubectl", "get pods -n web", Some("nginx CrashLoopBackOff"), Some(1)),
                ("kubectl", "describe pod nginx", Some("ErrImagePull"), Some(2)),
                ("trivy", "image nginx:1.99", Some("not found"), None),
            ]
        );
        assert_eq!(r.attributes["agent_status"], "success");
    }

    #[test]
    fn diagnose_and_analyze_build_the_question_and_take_model_and_cluster_from_the_query() {
        let r = answered(
            "/api/diagnose",
            Some("model=qwen-max&cluster=staging"),
            br#"{"name":"api-7d9","namespace":"shop"}"#,
            200,
            br#"{"message":"OOMKilled","status":"success"}"#,
        );
        assert_eq!(r.question, "diagnose shop/api-7d9");
        assert_eq!((r.model_name.as_deref(), r.cluster.as_deref()), (Some("qwen-max"), Some("staging")));
        let r = answered("/api/analyze", None, br#"{"resource":"deployment/nginx"}"#, 200, br#"{"message":"ok"}"#);
        assert_eq!(r.question, "analyze deployment/nginx");
        assert_eq!((r.model_name.as_deref(), r.cluster.as_deref()), (Some(DEFAULT_MODEL), Some(DEFAULT_CLUSTER)));
        assert!(r.thoughts.is_empty() && r.tool_calls.is_empty());
    }

    #[test]
    fn error_replies_are_errors_with_their_text_and_status() {
        let r = answered("/api/execute", None, br#"{"instructions":"q"}"#, 500, br#"{"error":"model timeout"}"#);
        assert_eq!((r.status, r.http_status, r.error.as_deref()), (Status::Error, Some(500), Some("model timeout")));
        let r = answered("/api/execute", None, br#"{"instructions":"q"}"#, 401, b"unauthorized\n");
        assert_eq!((r.status, r.error.as_deref()), (Status::Error, Some("unauthorized")));
        assert_eq!(r.attributes["response_body"], "not_json");
        let r =
            answered("/api/execute", None, br#"{"instructions":"q"}"#, 200, br#"{"message":"boom","status":"error"}"#);
        assert_eq!(
            (r.status, r.error.as_deref(), r.final_answer.as_deref()),
            (Status::Error, Some("boom"), Some("boom"))
        );
        let r = answered(
            "/api/execute",
            None,
            br#"{"instructions":"q"}"#,
            200,
            br#"{"message":"...","status":"processing"}"#,
        );
        assert_eq!((r.status, &r.attributes["agent_status"]), (Status::Success, &json!("processing")));
    }

    #[test]
    fn unreadable_bodies_still_give_a_marked_record() {
        let r = map_exchange(&Exchange {
            path: "/api/execute",
            query: None,
            request: Captured { bytes: br#"{"instructions":"very lo"#, truncated: true },
            ending: Ending::Answered { status: 200, body: Captured { bytes: b"{\"mess", truncated: true } },
        });
        assert!(r.question.contains("truncated"), "{}", r.question);
        assert_eq!(r.attributes["request_body"], "truncated");
        assert_eq!(r.attributes["response_body"], "truncated");
        assert_eq!(r.status, Status::Success);
        let r = answered("/api/execute", None, b"not json", 200, b"<html>");
        assert!(r.question.contains("unparsable"), "{}", r.question);
        assert_eq!(r.attributes["request_body"], "not_json");
    }

    #[test]
    fn failures_without_an_answer_are_error_timeout_or_cancelled() {
        let exchange = |ending| Exchange {
            path: "/api/analyze",
            query: None,
            request: Captured::whole(br#"{"resource":"pod/x"}"#),
            ending,
        };
        let r = map_exchange(&exchange(Ending::Unreachable { status: 502, reason: "connection refused" }));
        assert_eq!(
            (r.status, r.http_status, r.error.as_deref()),
            (Status::Error, Some(502), Some("connection refused"))
        );
        let r = map_exchange(&exchange(Ending::TimedOut { status: 504, reason: "no answer within 1s" }));
        assert_eq!((r.status, r.http_status), (Status::Timeout, Some(504)));
        let r = map_exchange(&exchange(Ending::ClientGone));
        assert_eq!((r.status, r.http_status), (Status::Cancelled, None));
        let r = map_exchange(&exchange(Ending::Interrupted {
            status: 200,
            body: Captured::whole(b"{\"mes"),
            client_gone: true,
            reason: "the client went away during the answer",
        }));
        assert_eq!((r.status, r.http_status), (Status::Cancelled, Some(200)));
        assert_eq!(r.question, "analyze pod/x");
    }
}

/// Name of the seed's session cookie.
pub const SESSION_COOKIE: &str = "session_id";
/// Lifetime of a new session cookie, as the seed sets it (one day).
pub const SESSION_MAX_AGE_SECS: u32 = 86_400;

/// The session in the values of a request's `Cookie` headers: the first `session_id`
/// that is a UUID.
pub fn session_in_cookies<'a>(values: impl IntoIterator<Item = &'a str>) -> Option<Uuid> {
    values
        .into_iter()
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == SESSION_COOKIE)
        .and_then(|(_, value)| Uuid::parse_str(value.trim().trim_matches('"')).ok())
}

/// The session a response's `Set-Cookie` value sets, if it sets a `session_id` UUID.
pub fn session_in_set_cookie(value: &str) -> Option<Uuid> {
    session_in_cookies(value.split(';').next())
}

/// The `Set-Cookie` value for a new session, as the seed's gin `SetCookie` writes it.
pub fn session_set_cookie(id: Uuid) -> String {
    format!("{SESSION_COOKIE}={id}; Path=/; Max-Age={SESSION_MAX_AGE_SECS}; HttpOnly")
}

#[cfg(test)]
mod session_tests {
    use super::*;

    #[test]
    fn the_session_is_read_from_cookies_and_set_cookies() {
        let id = Uuid::now_v7();
        assert_eq!(session_in_cookies(["theme=dark", &format!("a=1; session_id={id}; b=2")]), Some(id));
        assert_eq!(session_in_cookies(["session_id=not-a-uuid"]), None);
        assert_eq!(session_in_set_cookie(&session_set_cookie(id)), Some(id));
        assert_eq!(session_in_set_cookie("other=1; Path=/"), None);
    }
}
