//! `helm`: the sub-command among the positional words, flags in any order.

/// Flags that take a value (when not written `--flag=value`).
const VALUE_FLAGS: &[&str] = &[
    "-n",
    "--namespace",
    "--kube-context",
    "--kubeconfig",
    "-f",
    "--values",
    "--set",
    "--set-string",
    "--set-file",
    "--set-json",
    "--version",
    "--repo",
    "-o",
    "--output",
    "--timeout",
    "--description",
    "--post-renderer",
    "--revision",
    "--max",
    "--kube-as-user",
    "--kube-as-group",
    "--kube-token",
    "--kube-apiserver",
    "--registry-config",
    "--repository-config",
];

/// The rule `helm ARGS…` (`args` without the program name) triggers, if any.
pub(crate) fn analyze(args: &[String]) -> Option<&'static str> {
    let mut positional = Vec::new();
    let mut dry_run = false;
    let mut i = 0;
    while i < args.len() {
        let word = args[i].as_str();
        i += 1;
        if word.starts_with("--dry-run") {
            dry_run = word != "--dry-run=none" && word != "--dry-run=false";
        } else if word.starts_with('-') {
            if !word.contains('=') && VALUE_FLAGS.contains(&word) {
                i += 1;
            }
        } else {
            positional.push(word);
        }
    }
    let verb = *positional.first()?;
    let sub = positional.get(1).copied().unwrap_or_default();
    let rule = match verb {
        "uninstall" | "delete" | "del" | "un" | "remove" => "helm_uninstall",
        "rollback" => "helm_rollback",
        "install" | "upgrade" | "i" => "helm_upgrade",
        "repo" if matches!(sub, "add" | "remove" | "rm") => "helm_repo_change",
        "plugin" if matches!(sub, "install" | "uninstall" | "update") => "helm_repo_change",
        _ => return None,
    };
    if dry_run && matches!(rule, "helm_upgrade" | "helm_uninstall" | "helm_rollback") {
        return Some("dry_run");
    }
    Some(rule)
}
