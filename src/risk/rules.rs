//! The built-in rules: each a name stored in `risk_rule`, its default level and what it
//! means. One rule has one level; where the same verb is worse in some forms (a delete of
//! a namespace, a recursive `rm` of `/`), those forms are rules of their own, so an
//! override (`audit.risk.overrides`) always changes exactly one thing.

use crate::model::RiskLevel::{self, Critical, High, Low, Medium, None as Nothing};

/// A built-in rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BuiltinRule {
    /// Name stored in `risk_rule`.
    pub name: &'static str,
    /// Default level.
    pub level: RiskLevel,
    /// What it flags.
    pub description: &'static str,
}

const fn rule(name: &'static str, level: RiskLevel, description: &'static str) -> BuiltinRule {
    BuiltinRule { name, level, description }
}

/// Every built-in rule, in the order the README documents them.
pub const BUILTIN_RULES: &[BuiltinRule] = &[
    // kubectl / oc
    rule("kubectl_delete_namespace", Critical, "kubectl delete of a namespace"),
    rule("kubectl_delete_all", Critical, "kubectl delete --all, or across all namespaces (-A)"),
    rule("kubectl_delete", High, "kubectl delete of named objects, a selector or a file"),
    rule("kubectl_drain", High, "kubectl drain: evicts every pod of a node"),
    rule("kubectl_cordon", Medium, "kubectl cordon/uncordon: stops or resumes scheduling on a node"),
    rule("kubectl_taint", Medium, "kubectl taint: changes which pods a node takes"),
    rule("kubectl_scale_to_zero", High, "kubectl scale --replicas=0 (or autoscale to 0): stops a workload"),
    rule("kubectl_scale", Medium, "kubectl scale/autoscale to a non-zero size"),
    rule("kubectl_apply_prune", High, "kubectl apply --prune: deletes what the files do not list"),
    rule("kubectl_replace_force", High, "kubectl replace --force: deletes and recreates"),
    rule("kubectl_apply", Medium, "kubectl apply"),
    rule("kubectl_patch", Medium, "kubectl patch"),
    rule("kubectl_replace", Medium, "kubectl replace"),
    rule("kubectl_edit", Medium, "kubectl edit"),
    rule("kubectl_create", Medium, "kubectl create (not RBAC, not tokens)"),
    rule("kubectl_run", Medium, "kubectl run: starts a pod"),
    rule("kubectl_expose", Medium, "kubectl expose: creates a service"),
    rule("kubectl_set_image", Medium, "kubectl set image: changes what a workload runs"),
    rule("kubectl_set", Medium, "kubectl set env/resources/serviceaccount/…"),
    rule("kubectl_label", Low, "kubectl label/annotate"),
    rule("kubectl_rollout_undo", High, "kubectl rollout undo: rolls a workload back"),
    rule("kubectl_rollout_restart", Medium, "kubectl rollout restart: restarts every pod of a workload"),
    rule("kubectl_rollout_pause", Medium, "kubectl rollout pause/resume"),
    rule("kubectl_exec", High, "kubectl exec: runs a command inside a container"),
    rule("kubectl_attach", High, "kubectl attach: attaches to a running container"),
    rule("kubectl_debug", High, "kubectl debug: ephemeral or node debugging containers"),
    rule("kubectl_cp", Medium, "kubectl cp: copies files in or out of a container"),
    rule("kubectl_port_forward", Medium, "kubectl port-forward: opens a path into the cluster"),
    rule("kubectl_proxy", Medium, "kubectl proxy: exposes the API server locally"),
    rule("kubectl_certificate_approve", High, "kubectl certificate approve: issues a client certificate"),
    rule("kubectl_certificate_deny", Medium, "kubectl certificate deny"),
    rule("kubectl_cluster_wide", High, "a mutating kubectl verb across all namespaces (-A)"),
    rule("kubectl_config_change", Low, "kubectl config use-context/set-…: changes the local kubeconfig"),
    rule("kubectl_other", Low, "a kubectl verb or plugin not known to be read-only"),
    rule("rbac_cluster_admin", Critical, "binds cluster-admin"),
    rule("rbac_change", High, "creates or changes (cluster)roles or (cluster)rolebindings"),
    rule("token_create", High, "kubectl create token: mints a service-account token"),
    rule("impersonation", High, "a mutating kubectl verb run as someone else (--as, --as-group)"),
    rule("impersonation_read", Medium, "reading or probing permissions as someone else (auth can-i --as)"),
    rule("secret_read", High, "reads secret values: -o yaml/json of secrets, view-secret, vault/cloud secret reads"),
    rule("secret_list", Medium, "lists or describes secrets without their values"),
    rule("kubeconfig_read", High, "kubectl config view --raw: prints credentials"),
    rule("secret_file_read", High, "reads a credential file (/etc/shadow, kubeconfig, SSH keys, SA tokens)"),
    rule("dry_run", Nothing, "a mutating command run with --dry-run (client or server): changes nothing"),
    // helm
    rule("helm_uninstall", High, "helm uninstall/delete of a release"),
    rule("helm_rollback", High, "helm rollback of a release"),
    rule("helm_upgrade", Medium, "helm install/upgrade"),
    rule("helm_repo_change", Low, "helm repo add/remove, plugin install"),
    // shell
    rule("shell_rm_root", Critical, "recursive rm of /, a top-level system directory or $HOME"),
    rule("shell_rm_rf", High, "recursive rm"),
    rule("shell_rm", Low, "rm of files"),
    rule("shell_find_delete", Medium, "find … -delete or -exec rm"),
    rule("shell_disk_format", Critical, "mkfs, wipefs, fdisk, parted…: formats or repartitions a disk"),
    rule("shell_device_write", Critical, "dd of=/dev/… or a redirect onto a block device"),
    rule("shell_shutdown", High, "shutdown, reboot, halt, poweroff"),
    rule("shell_firewall_flush", High, "iptables -F/-X, nft flush ruleset, ufw disable/reset"),
    rule("shell_chmod_777", High, "chmod -R 777 (world-writable tree)"),
    rule("shell_chmod_world", Low, "chmod 777 of single files"),
    rule("pipe_to_shell", High, "downloads a script and runs it (curl … | sh, bash <(curl …))"),
    rule("shell_kill", Medium, "kill, pkill, killall"),
    rule("shell_service_change", Medium, "systemctl/service stop, restart, disable, mask"),
    rule("container_destroy", High, "docker/podman/crictl rm, rmi, prune"),
    rule("container_stop", Medium, "docker/podman/crictl stop, kill, restart"),
    rule("etcd_delete", High, "etcdctl del"),
    rule("redis_flush", High, "redis-cli FLUSHALL/FLUSHDB"),
    rule("terraform_destroy", Critical, "terraform destroy"),
    rule("terraform_apply", Medium, "terraform apply"),
    rule("cloud_delete", High, "aws/gcloud/az delete, terminate, s3 rm --recursive"),
    // SQL
    rule("sql_drop_database", Critical, "DROP DATABASE / DROP SCHEMA"),
    rule("sql_drop", High, "DROP TABLE/VIEW/INDEX…, ALTER … DROP"),
    rule("sql_truncate", High, "TRUNCATE"),
    rule("sql_delete_without_where", High, "DELETE without a WHERE (or WHERE 1=1)"),
    rule("sql_update_without_where", High, "UPDATE without a WHERE (or WHERE 1=1)"),
    rule("sql_privilege_change", High, "GRANT, REVOKE, CREATE/ALTER/DROP ROLE or USER"),
    rule("sql_delete", Medium, "DELETE … WHERE"),
    rule("sql_update", Medium, "UPDATE … WHERE"),
    rule("sql_alter", Medium, "ALTER TABLE (not dropping)"),
    rule("sql_kill_session", Medium, "pg_terminate_backend, KILL"),
    rule("sql_write", Low, "INSERT, COPY … FROM, MERGE"),
    rule("sql_ddl", Low, "CREATE TABLE/INDEX/VIEW…"),
    rule("sql_maintenance", Low, "VACUUM, ANALYZE, REINDEX, CLUSTER"),
];

/// The built-in rule of that name.
pub fn builtin(name: &str) -> Option<&'static BuiltinRule> {
    BUILTIN_RULES.iter().find(|r| r.name == name)
}
