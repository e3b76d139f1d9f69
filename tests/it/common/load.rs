//! Steady HTTP load for the fault and distributed tests: tasks post arrays of records
//! to a real server and keep the ids it acknowledged, so a test can compare them with
//! what the database holds.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use uuid::Uuid;

/// Each task posts an array of `per_request` records every `interval` and keeps the ids
/// the server acknowledged (202, or `accepted` inside a partial answer). A refused
/// connection or a `503` acknowledges nothing; any other answer fails the test.
pub struct Load {
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<(BTreeSet<Uuid>, usize)>>,
}

impl Load {
    /// Starts `tasks` tasks against `127.0.0.1:port`; `record(task, i)` makes the
    /// `i`-th record of a task (it must carry a fresh `interaction_id`).
    pub fn start(
        port: u16,
        tasks: usize,
        per_request: usize,
        interval: Duration,
        record: fn(usize, usize) -> Value,
    ) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let tasks = (0..tasks)
            .map(|t| {
                let stop = stop.clone();
                tokio::spawn(async move {
                    let client = reqwest::Client::builder().timeout(Duration::from_secs(40)).build().expect("client");
                    let url = format!("http://127.0.0.1:{port}/api/v1/interactions");
                    let (mut acked, mut sent) = (BTreeSet::new(), 0usize);
                    let mut tick = tokio::time::interval(interval);
                    while !stop.load(Ordering::Relaxed) {
                        tick.tick().await;
                        let body: Vec<Value> = (0..per_request).map(|i| record(t, sent + i)).collect();
                        sent += per_request;
                        acked.extend(post(&client, &url, &body).await);
                    }
                    (acked, sent)
                })
            })
            .collect();
        Load { stop, tasks }
    }

    /// Stops the tasks; the acknowledged ids and how many records were sent.
    pub async fn finish(self) -> (BTreeSet<Uuid>, usize) {
        self.stop.store(true, Ordering::Relaxed);
        let mut acked = BTreeSet::new();
        let mut sent = 0;
        for task in self.tasks {
            let (a, s) = task.await.expect("load task");
            acked.extend(a);
            sent += s;
        }
        (acked, sent)
    }
}

/// Posts `body`; the acknowledged ids.
pub async fn post(client: &reqwest::Client, url: &str, body: &[Value]) -> BTreeSet<Uuid> {
    let mut acked = BTreeSet::new();
    let Ok(response) = client.post(url).json(&body).send().await else { return acked };
    let status = response.status().as_u16();
    let Ok(answer) = response.json::<Value>().await else { return acked };
    assert!(status == 202 || status == 503, "unexpected answer {status}: {answer}");
    for result in answer["results"].as_array().into_iter().flatten() {
        if result["status"] == "accepted" {
            acked.insert(result["interaction_id"].as_str().expect("accepted id").parse().expect("uuid"));
        }
    }
    acked
}
