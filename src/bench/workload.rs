//! The standard workload of SPEC.md: one interaction = a ~60-character question, one
//! ~1 KB thought, a ~0.9 KB answer, 3 tool calls each with a ~1.6 KB observation and 3
//! performance metrics, spread over 200 sessions, 50 users and 3 models.
//!
//! Content is deterministic for a seed. Ids are fresh per [`Workload`] (a run), so running
//! the benchmark twice against one database measures inserts, not duplicate skips.

use chrono::{Duration as ChronoDuration, Utc};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use uuid::Uuid;

use crate::model::{Interaction, Status, Thought, ToolCall};

const SESSIONS: usize = 200;
const USERS: usize = 50;
const MODELS: [(&str, &str); 3] = [("gpt-4o", "openai"), ("claude-sonnet-4", "anthropic"), ("qwen-max", "dashscope")];
/// Text variants per field; records pick one and append their index, so rows differ
/// without the generator dominating the benchmark.
const VARIANTS: usize = 64;
const WORDS: &[&str] = &[
    "pod",
    "deployment",
    "namespace",
    "node",
    "restart",
    "crashloop",
    "memory",
    "limit",
    "oom",
    "killed",
    "container",
    "image",
    "pull",
    "backoff",
    "service",
    "endpoint",
    "ingress",
    "latency",
    "error",
    "timeout",
    "replica",
    "scheduler",
    "taint",
    "toleration",
    "volume",
    "mount",
    "secret",
    "configmap",
    "probe",
    "readiness",
    "liveness",
    "cpu",
    "throttling",
    "event",
    "warning",
    "kubelet",
    "etcd",
    "apiserver",
    "rollout",
    "revision",
];

/// Generator of standard-workload records.
#[derive(Debug)]
pub struct Workload {
    sessions: Vec<Uuid>,
    questions: Vec<String>,
    thoughts: Vec<String>,
    answers: Vec<String>,
    observations: Vec<String>,
    started: chrono::DateTime<Utc>,
    rng: StdRng,
}

fn sentence(rng: &mut StdRng, target_len: usize) -> String {
    let mut s = String::with_capacity(target_len + 16);
    while s.len() < target_len {
        if !s.is_empty() {
            s.push(' ');
        }
        s.push_str(WORDS[rng.random_range(0..WORDS.len())]);
    }
    s.truncate(target_len);
    s
}

impl Workload {
    /// A workload whose content is fixed by `seed`.
    pub fn new(seed: u64) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut pool = |len: usize| (0..VARIANTS).map(|_| sentence(&mut rng, len)).collect::<Vec<_>>();
        let questions = pool(52);
        let thoughts = pool(1024);
        let answers = pool(900);
        let observations = pool(1600);
        Workload {
            sessions: (0..SESSIONS).map(|_| Uuid::now_v7()).collect(),
            questions,
            thoughts,
            answers,
            observations,
            started: Utc::now(),
            rng: StdRng::seed_from_u64(seed.wrapping_add(1)),
        }
    }

    /// The `i`-th record.
    pub fn record(&mut self, i: u64) -> Interaction {
        let rng = &mut self.rng;
        let session = rng.random_range(0..SESSIONS);
        let (model, provider) = MODELS[rng.random_range(0..MODELS.len())];
        let mut pick = |pool: &[String]| pool[rng.random_range(0..pool.len())].clone();
        let mut r = Interaction::new(format!("{} #{i}", pick(&self.questions)));
        r.session_id = self.sessions[session];
        r.user_id = Some(format!("user-{:02}", session % USERS));
        r.created_at = self.started + ChronoDuration::milliseconds(i as i64);
        r.endpoint = Some("/api/execute".into());
        r.model_name = Some(model.into());
        r.provider = Some(provider.into());
        r.cluster = Some(format!("prod-{}", session % 4));
        r.thoughts.push(Thought { content: pick(&self.thoughts), sequence_number: 1 });
        for (n, tool) in ["kubectl", "kubectl", "shell"].iter().enumerate() {
            r.tool_calls.push(ToolCall {
                tool_name: (*tool).into(),
                tool_input: format!("get pods -n team-{} -o wide", (i as usize + n) % 40),
                tool_observation: Some(pick(&self.observations)),
                sequence_number: n as i32 + 1,
                duration_ms: Some(40 + (i as i64 + n as i64) % 300),
                thought_sequence_number: Some(1),
                error: None,
                ..ToolCall::new("", "")
            });
        }
        r.final_answer = Some(pick(&self.answers));
        r.status = if i.is_multiple_of(50) { Status::Error } else { Status::Success };
        r.http_status = Some(if r.status == Status::Error { 500 } else { 200 });
        r.total_duration_ms = Some(2000 + (i as i64 % 5000));
        r.assistant_duration_ms = Some(1500 + (i as i64 % 4000));
        r.parse_duration_ms = Some(i as i64 % 20);
        r.metrics.insert("llm_first_token_ms".into(), 300 + i as i64 % 900);
        r.metrics.insert("tool_total_ms".into(), 120 + i as i64 % 600);
        r.metrics.insert("parse_ms".into(), i as i64 % 20);
        r.input_tokens = Some(1200);
        r.output_tokens = Some(300);
        r
    }
}

/// Approximate payload size of a record (its text and numbers), for MB/s figures.
pub fn payload_bytes(r: &Interaction) -> usize {
    let opt = |s: &Option<String>| s.as_ref().map_or(0, String::len);
    r.question.len()
        + opt(&r.final_answer)
        + opt(&r.user_id)
        + opt(&r.model_name)
        + opt(&r.provider)
        + opt(&r.cluster)
        + opt(&r.endpoint)
        + r.thoughts.iter().map(|t| t.content.len() + 4).sum::<usize>()
        + r.tool_calls
            .iter()
            .map(|c| c.tool_name.len() + c.tool_input.len() + opt(&c.tool_observation) + 16)
            .sum::<usize>()
        + r.metrics.keys().map(|k| k.len() + 8).sum::<usize>()
        + 32 * 2
        + 8 * 8
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_is_deterministic_and_sized_as_specified() {
        let (mut a, mut b) = (Workload::new(7), Workload::new(7));
        let (ra, rb) = (a.record(3), b.record(3));
        assert_eq!(ra.question, rb.question);
        assert_eq!(ra.tool_calls, rb.tool_calls);
        assert_eq!(ra.thoughts[0].content.len(), 1024);
        assert_eq!(ra.tool_calls.len(), 3);
        assert_eq!(ra.tool_calls[0].tool_observation.as_ref().unwrap().len(), 1600);
        assert_eq!(ra.metrics.len(), 3);
        assert!((55..=70).contains(&ra.question.len()), "{}", ra.question.len());
    }
}
