//! `kubectl` (and `oc`, `k`): flags in any order, the verb and its object found among
//! the positional words, so `kubectl -n prod delete pod x`, `kubectl delete -n prod pod
//! x` and `k delete pod/x --namespace=prod` read the same, and a word that merely
//! contains a verb (`-l app=delete-me`, `logs deploy/drain-worker`) is never one.

/// Short flags that take a value in every kubectl verb.
const SHORT_VALUE: &[&str] = &["-n", "-l", "-o", "-c", "-s", "-v", "-L", "-k", "-e"];
/// Long flags that take a value (when not written `--flag=value`).
const LONG_VALUE: &[&str] = &[
    "--namespace",
    "--context",
    "--kubeconfig",
    "--cluster",
    "--user",
    "--server",
    "--token",
    "--as",
    "--as-group",
    "--as-uid",
    "--request-timeout",
    "--certificate-authority",
    "--client-certificate",
    "--client-key",
    "--cache-dir",
    "--tls-server-name",
    "--selector",
    "--output",
    "--filename",
    "--container",
    "--field-selector",
    "--replicas",
    "--current-replicas",
    "--min",
    "--max",
    "--cpu-percent",
    "--type",
    "--patch",
    "--timeout",
    "--grace-period",
    "--sort-by",
    "--template",
    "--image",
    "--port",
    "--target-port",
    "--kustomize",
    "--label-columns",
    "--to-revision",
    "--clusterrole",
    "--role",
    "--serviceaccount",
    "--group",
    "--since",
    "--tail",
    "--address",
    "--pod-selector",
    "--env",
    "--profile",
    "--target",
    "--prune-allowlist",
    "--field-manager",
    "--subresource",
    "--duration",
    "--audience",
    "--chunk-size",
    "--v",
];

/// Verbs that change nothing.
const READ_ONLY: &[&str] = &[
    "get",
    "describe",
    "logs",
    "log",
    "top",
    "explain",
    "api-resources",
    "api-versions",
    "version",
    "cluster-info",
    "events",
    "diff",
    "wait",
    "completion",
    "options",
    "help",
    "kustomize",
    "whoami",
    "status",
    "projects",
    "project",
];

/// What a kubectl command was found to be: its rule (if any) and, for `exec`/`debug`,
/// the command it runs inside the container.
#[derive(Debug, Default)]
pub(crate) struct Outcome {
    /// The rule that applies; several may, the caller takes the highest.
    pub rules: Vec<&'static str>,
    /// Words after `--` (`kubectl exec pod -- rm -rf /data`).
    pub inner: Option<Vec<String>>,
}

/// A kubectl command line split into flags and positional words.
struct Parsed<'a> {
    positional: Vec<&'a str>,
    flags: Vec<(&'a str, Option<&'a str>)>,
    inner: Option<Vec<String>>,
}

impl<'a> Parsed<'a> {
    fn flag(&self, names: &[&str]) -> Option<Option<&'a str>> {
        self.flags.iter().find(|(n, _)| names.contains(n)).map(|(_, v)| *v)
    }

    fn has(&self, names: &[&str]) -> bool {
        self.flag(names).is_some()
    }
}

fn parse(args: &[String]) -> Parsed<'_> {
    let mut parsed = Parsed { positional: Vec::new(), flags: Vec::new(), inner: None };
    let mut i = 0;
    while i < args.len() {
        let word = args[i].as_str();
        i += 1;
        if word == "--" {
            parsed.inner = Some(args[i..].to_vec());
            break;
        }
        if word.len() < 2 || !word.starts_with('-') {
            parsed.positional.push(word);
            continue;
        }
        if let Some((name, value)) = word.split_once('=') {
            parsed.flags.push((name, Some(value)));
            continue;
        }
        let verb = parsed.positional.first().copied();
        // `-p` is --patch for `patch` and --previous for `logs`; `-f` is --filename
        // everywhere but `logs`, where it is --follow.
        let takes_value = SHORT_VALUE.contains(&word)
            || LONG_VALUE.contains(&word)
            || (word == "-p" && verb == Some("patch"))
            || (word == "--raw" && verb == Some("get"))
            || (word == "-f" && !matches!(verb, Some("logs" | "log")));
        if takes_value && i < args.len() {
            parsed.flags.push((word, Some(args[i].as_str())));
            i += 1;
        } else if word.starts_with("--") || word.len() == 2 {
            parsed.flags.push((word, None));
        } else {
            // A cluster of short boolean flags (`-it`).
            parsed.flags.push((word, None));
        }
    }
    parsed
}

/// The kind of a resource word (`pods/x` → `pods`, `deployments.apps` → `deployments`).
fn kinds(resource: &str) -> impl Iterator<Item = String> + '_ {
    let kinds = resource.split('/').next().unwrap_or_default();
    kinds.split(',').map(|k| k.split('.').next().unwrap_or_default().to_ascii_lowercase())
}

fn is_namespace(kind: &str) -> bool {
    matches!(kind, "ns" | "namespace" | "namespaces" | "project" | "projects")
}

fn is_secret(kind: &str) -> bool {
    matches!(kind, "secret" | "secrets")
}

fn is_rbac(kind: &str) -> bool {
    matches!(
        kind,
        "role"
            | "roles"
            | "rolebinding"
            | "rolebindings"
            | "clusterrole"
            | "clusterroles"
            | "clusterrolebinding"
            | "clusterrolebindings"
    )
}

fn dry_run(p: &Parsed<'_>) -> bool {
    match p.flag(&["--dry-run"]) {
        Some(None) => true,
        Some(Some(mode)) => mode != "none",
        None => false,
    }
}

/// Classifies `kubectl ARGS…` (`args` without the program name).
pub(crate) fn analyze(args: &[String]) -> Outcome {
    let p = parse(args);
    let mut out = Outcome { inner: p.inner.clone(), ..Outcome::default() };
    let Some(&verb) = p.positional.first() else {
        return out;
    };
    let sub = p.positional.get(1).copied().unwrap_or_default();
    let objects = &p.positional[1..];
    let any_kind = |test: fn(&str) -> bool| objects.iter().take(1).flat_map(|o| kinds(o)).any(|k| test(&k));
    let all_ns = p.has(&["-A", "--all-namespaces"]);
    let impersonating = p.has(&["--as", "--as-group", "--as-uid"]);

    let read_only = READ_ONLY.contains(&verb)
        || (verb == "rollout" && matches!(sub, "status" | "history"))
        || (verb == "auth" && matches!(sub, "can-i" | "whoami"))
        || (verb == "config" && !is_config_change(sub))
        || (verb == "plugin" && sub == "list")
        || (verb == "certificate" && sub.is_empty());
    if read_only {
        if matches!(verb, "get" | "describe") && any_kind(is_secret) {
            out.rules.push(if verb == "get" && shows_values(&p) { "secret_read" } else { "secret_list" });
        }
        if verb == "get" && p.flag(&["--raw"]).flatten().is_some_and(|path| path.contains("/secrets")) {
            out.rules.push("secret_read");
        }
        if verb == "config" && sub == "view" && p.has(&["--raw", "--flatten"]) {
            out.rules.push("kubeconfig_read");
        }
        if impersonating {
            out.rules.push("impersonation_read");
        }
        return out;
    }
    if verb == "config" {
        out.rules.push("kubectl_config_change");
        return out;
    }
    if dry_run(&p) {
        out.rules.push("dry_run");
        return out;
    }
    let rule = match verb {
        "delete" if any_kind(is_namespace) => "kubectl_delete_namespace",
        "delete" if p.has(&["--all"]) || (all_ns && !p.has(&["-l", "--selector", "--field-selector"])) => {
            "kubectl_delete_all"
        }
        "delete" => "kubectl_delete",
        "drain" => "kubectl_drain",
        "cordon" | "uncordon" => "kubectl_cordon",
        "taint" => "kubectl_taint",
        "scale" | "autoscale" => {
            let zero = ["--replicas", "--max", "--min"]
                .iter()
                .any(|f| p.flag(&[f]).flatten().is_some_and(|v| v.trim().parse::<i64>() == Ok(0)));
            if zero {
                "kubectl_scale_to_zero"
            } else {
                "kubectl_scale"
            }
        }
        "apply" if p.has(&["--prune"]) => "kubectl_apply_prune",
        "replace" if p.has(&["--force"]) => "kubectl_replace_force",
        "apply" | "patch" | "replace" | "edit" if any_kind(is_rbac) => "rbac_change",
        "apply" => "kubectl_apply",
        "patch" => "kubectl_patch",
        "replace" => "kubectl_replace",
        "edit" => "kubectl_edit",
        "create" => match sub {
            "clusterrolebinding" | "rolebinding" if p.flag(&["--clusterrole"]).flatten() == Some("cluster-admin") => {
                "rbac_cluster_admin"
            }
            "role" | "clusterrole" | "rolebinding" | "clusterrolebinding" => "rbac_change",
            "token" => "token_create",
            _ => "kubectl_create",
        },
        "run" => "kubectl_run",
        "expose" => "kubectl_expose",
        "set" if sub == "image" => "kubectl_set_image",
        "set" => "kubectl_set",
        "label" | "annotate" => "kubectl_label",
        "rollout" => match sub {
            "undo" => "kubectl_rollout_undo",
            "restart" => "kubectl_rollout_restart",
            _ => "kubectl_rollout_pause",
        },
        "exec" => "kubectl_exec",
        "attach" => "kubectl_attach",
        "debug" => "kubectl_debug",
        "cp" => "kubectl_cp",
        "port-forward" => "kubectl_port_forward",
        "proxy" => "kubectl_proxy",
        "certificate" if sub == "approve" => "kubectl_certificate_approve",
        "certificate" => "kubectl_certificate_deny",
        "auth" if sub == "reconcile" => "rbac_change",
        "view-secret" => "secret_read",
        _ => "kubectl_other",
    };
    out.rules.push(rule);
    if all_ns && rule != "kubectl_delete_all" {
        out.rules.push("kubectl_cluster_wide");
    }
    if impersonating {
        out.rules.push("impersonation");
    }
    out
}

fn is_config_change(sub: &str) -> bool {
    matches!(
        sub,
        "use-context"
            | "use"
            | "set-context"
            | "set-cluster"
            | "set-credentials"
            | "set"
            | "unset"
            | "delete-context"
            | "delete-cluster"
            | "delete-user"
            | "rename-context"
    )
}

/// `get` output that prints secret values (`-o yaml`, `json`, `jsonpath=…`, templates).
fn shows_values(p: &Parsed<'_>) -> bool {
    p.flag(&["-o", "--output"]).flatten().is_some_and(|format| {
        let format = format.to_ascii_lowercase();
        ["yaml", "json", "jsonpath", "go-template", "template", "custom-columns"].iter().any(|f| format.starts_with(f))
    })
}
