//! Shell commands: wrappers taken off (`sudo`, `env`, `VAR=x`, `timeout`, `xargs`,
//! `nohup`…), interpreters followed into their scripts (`sh -c "…"`, `ssh host "…"`,
//! `kubectl exec … -- …`, `psql -c "…"`), then the command judged by its program name
//! and arguments, never by a substring of the whole line.

use super::command::{program, segments, split_words, strip_redirections, FETCHED};
use super::{helm, kubectl, sql, Finding};

/// Deepest nesting of interpreters followed (`sh -c "bash -c '…'"`).
const MAX_DEPTH: usize = 6;

/// Classifies every command of a shell script.
pub(crate) fn analyze_script(script: &str, out: &mut Vec<Finding>, depth: usize) {
    let mut previous: Option<String> = None;
    for segment in segments(script) {
        let words = split_words(&segment.text);
        let prev = if segment.piped { previous.as_deref() } else { None };
        let name = analyze_words(words, prev, out, depth);
        previous = name;
    }
}

/// Classifies one command given as words; `piped_from` is the program whose output it
/// reads. Returns its program name (after wrappers), for the command piped into next.
pub(crate) fn analyze_words(
    words: Vec<String>,
    piped_from: Option<&str>,
    out: &mut Vec<Finding>,
    depth: usize,
) -> Option<String> {
    let (words, targets) = strip_redirections(words);
    let mut rules = Vec::new();
    if targets.iter().any(|t| is_block_device(t)) {
        rules.push("shell_device_write");
    }
    let words = unwrap(words);
    let Some(first) = words.first() else {
        if !rules.is_empty() {
            out.push(Finding { words, rules });
        }
        return None;
    };
    let name = program(first).to_owned();
    let args = &words[1..];
    let mut nested: Vec<Vec<String>> = Vec::new();
    let mut scripts: Vec<String> = Vec::new();
    let mut statements: Vec<String> = Vec::new();
    if words.iter().any(|w| matches!(w.as_str(), "--show-secrets" | "--reveal" | "--with-decryption" | "--decrypt")) {
        rules.push("secret_read");
    }
    match name.as_str() {
        "kubectl" | "k" | "oc" | "kubectl.exe" => {
            let outcome = kubectl::analyze(args);
            rules.extend(outcome.rules);
            nested.extend(outcome.inner);
        }
        "microk8s" | "k3s" | "minikube" if args.first().is_some_and(|a| a == "kubectl") => {
            let rest: Vec<String> = args[1..].iter().filter(|a| *a != "--").cloned().collect();
            let outcome = kubectl::analyze(&rest);
            rules.extend(outcome.rules);
            nested.extend(outcome.inner);
        }
        "helm" => rules.extend(helm::analyze(args)),
        "sh" | "bash" | "zsh" | "dash" | "ash" | "ksh" | "busybox" => {
            match interpreter_script(args) {
                Some(Script::Inline(text)) => {
                    // Substituted by the outer shell (FETCHED) or by this one.
                    if text.contains(FETCHED) || ["$(curl", "$(wget", "`curl", "`wget"].iter().any(|f| text.contains(f))
                    {
                        rules.push("pipe_to_shell");
                    }
                    scripts.push(text);
                }
                Some(Script::File(file)) if file == FETCHED => rules.push("pipe_to_shell"),
                Some(Script::File(_)) => {}
                None if is_fetch(piped_from) => rules.push("pipe_to_shell"),
                None => {}
            }
        }
        "python" | "python3" | "perl" | "ruby" | "node" if is_fetch(piped_from) => rules.push("pipe_to_shell"),
        "ssh" => {
            if let Some(remote) = ssh_command(args) {
                scripts.push(remote);
            }
        }
        "psql" => statements.extend(option_values(args, &["-c", "--command"])),
        "mysql" | "mariadb" => statements.extend(option_values(args, &["-e", "--execute"])),
        "clickhouse-client" => statements.extend(option_values(args, &["-q", "--query"])),
        "sqlite3" => statements.extend(args.iter().filter(|a| !a.starts_with('-')).nth(1).cloned()),
        _ => rules.extend(program_rule(&name, args)),
    }
    if rules.is_empty() && sql::is_statement_keyword(&name) {
        // A SQL line in a script: the body of a here-document fed to a client.
        statements.push(words.join(" "));
    }
    for statement in &statements {
        rules.extend(sql::analyze(statement));
    }
    out.push(Finding { words, rules });
    if depth < MAX_DEPTH {
        for script in scripts {
            analyze_script(&script, out, depth + 1);
        }
        for inner in nested {
            analyze_words(inner, None, out, depth + 1);
        }
    }
    Some(name)
}

fn is_fetch(program: Option<&str>) -> bool {
    matches!(program, Some("curl" | "wget" | "fetch"))
}

fn is_block_device(path: &str) -> bool {
    ["/dev/sd", "/dev/nvme", "/dev/xvd", "/dev/vd", "/dev/hd", "/dev/mmcblk", "/dev/dm-", "/dev/mapper/", "/dev/md"]
        .iter()
        .any(|p| path.starts_with(p))
}

/// Keywords and wrappers that run the command after them, with the short options of
/// each that take a value.
fn wrapper(name: &str) -> Option<&'static [&'static str]> {
    Some(match name {
        "sudo" | "doas" => &["-u", "-g", "-h", "-p", "-C", "-D", "-r", "-t", "-U", "-T"],
        "env" => &["-u", "-C", "-S"],
        "nice" => &["-n"],
        "ionice" => &["-c", "-n", "-p"],
        "timeout" => &["-s", "-k"],
        "watch" => &["-n"],
        "xargs" => &["-I", "-n", "-P", "-L", "-d", "-E", "-s", "-a"],
        "stdbuf" => &["-i", "-o", "-e"],
        "nohup" | "time" | "exec" | "command" | "builtin" | "noglob" | "then" | "do" | "else" | "if" | "while"
        | "until" | "!" | "{" | "unbuffer" | "chroot" => &[],
        _ => return None,
    })
}

/// The command without its wrappers and leading `NAME=value` assignments.
fn unwrap(words: Vec<String>) -> Vec<String> {
    let mut start = 0;
    while start < words.len() {
        let word = words[start].as_str();
        if is_assignment(word) {
            start += 1;
            continue;
        }
        let name = program(word);
        let Some(value_flags) = wrapper(name) else {
            break;
        };
        start += 1;
        while start < words.len() {
            let w = words[start].as_str();
            if w == "--" {
                start += 1;
                break;
            }
            if name == "env" && is_assignment(w) {
                start += 1;
            } else if w.starts_with('-') && w.len() > 1 {
                start += if value_flags.contains(&w) { 2 } else { 1 };
            } else {
                break;
            }
        }
        // `timeout 30s cmd`: its first operand is the duration; `chroot DIR cmd`.
        if matches!(name, "timeout" | "chroot") && start < words.len() {
            start += 1;
        }
    }
    words.into_iter().skip(start).collect()
}

fn is_assignment(word: &str) -> bool {
    word.split_once('=').is_some_and(|(name, _)| {
        !name.is_empty()
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
            && !name.starts_with(|c: char| c.is_ascii_digit())
    })
}

enum Script {
    Inline(String),
    File(String),
}

/// What `sh ARGS…` runs: `-c SCRIPT` (in any flag cluster: `-lc`, `-ec`), a script
/// file, or (`None`) its standard input.
fn interpreter_script(args: &[String]) -> Option<Script> {
    let mut inline = false;
    let mut i = 0;
    while i < args.len() {
        let w = args[i].as_str();
        if w == "-o" || w == "+o" {
            i += 2;
            continue;
        }
        if let Some(flags) = w.strip_prefix('-').filter(|f| !f.is_empty() && !f.starts_with('-')) {
            inline |= flags.contains('c');
        } else if !w.starts_with("--") {
            return Some(if inline { Script::Inline(w.to_owned()) } else { Script::File(w.to_owned()) });
        }
        i += 1;
    }
    None
}

/// The command `ssh [OPTIONS] HOST COMMAND…` runs on the host.
fn ssh_command(args: &[String]) -> Option<String> {
    const VALUE: &str = "bcDEeFIiJLlmOopQRSWw";
    let mut i = 0;
    while i < args.len() {
        let w = args[i].as_str();
        if w.starts_with('-') && w.len() == 2 && VALUE.contains(&w[1..]) {
            i += 2;
        } else if w.starts_with('-') {
            i += 1;
        } else {
            let rest = &args[i + 1..];
            return (!rest.is_empty()).then(|| rest.join(" "));
        }
    }
    None
}

/// The values of an option in its forms `-c VALUE`, `-cVALUE`, `--command=VALUE` and
/// `--command VALUE` (`names`: short, then long).
fn option_values(args: &[String], names: &[&str]) -> Vec<String> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < args.len() {
        let w = args[i].as_str();
        if names.contains(&w) {
            out.extend(args.get(i + 1).cloned());
            i += 2;
            continue;
        }
        for name in names {
            if name.starts_with("--") {
                if let Some(v) = w.strip_prefix(name).and_then(|r| r.strip_prefix('=')) {
                    out.push(v.to_owned());
                }
            } else if let Some(v) = w.strip_prefix(name).filter(|v| !v.is_empty()) {
                out.push(v.to_owned());
            }
        }
        i += 1;
    }
    out
}

/// Flags of `args` as single letters (`-rf` → r, f) and long names (`--force`).
fn has_short(args: &[String], letter: char) -> bool {
    args.iter().any(|a| a.starts_with('-') && !a.starts_with("--") && a[1..].contains(letter))
}

fn has_long(args: &[String], name: &str) -> bool {
    args.iter().any(|a| a == name)
}

fn operands(args: &[String]) -> impl Iterator<Item = &str> {
    args.iter().map(String::as_str).filter(|a| !a.starts_with('-'))
}

/// Files whose reading exposes credentials.
fn is_secret_file(path: &str) -> bool {
    path == "/etc/shadow"
        || path == "/etc/gshadow"
        || path.ends_with(".kube/config")
        || path.ends_with("/etc/kubernetes/admin.conf")
        || (path.contains("/etc/kubernetes/pki/") && path.ends_with(".key"))
        || path.contains("/var/run/secrets/kubernetes.io/serviceaccount/token")
        || path.contains("/run/secrets/kubernetes.io/serviceaccount/token")
        || path.ends_with(".aws/credentials")
        || ["id_rsa", "id_ed25519", "id_ecdsa"].iter().any(|k| path.ends_with(k))
}

/// System paths whose recursive removal ruins a machine.
fn is_system_root(path: &str) -> bool {
    let trimmed = path.trim_end_matches(['/', '*']);
    if trimmed.is_empty() || matches!(path, "~" | "~/" | "$HOME" | "${HOME}" | "/*" | ".*") {
        return true;
    }
    let top = [
        "/bin",
        "/boot",
        "/dev",
        "/etc",
        "/home",
        "/lib",
        "/lib64",
        "/opt",
        "/proc",
        "/root",
        "/run",
        "/sbin",
        "/srv",
        "/sys",
        "/usr",
        "/var",
        "/var/lib",
        "/var/lib/etcd",
        "/var/lib/kubelet",
        "/var/lib/docker",
        "/var/lib/containerd",
        "/var/lib/postgresql",
        "/var/lib/mysql",
        "/etc/kubernetes",
    ];
    top.contains(&trimmed)
}

/// The rule of a command that is not an interpreter or client handled above.
fn program_rule(name: &str, args: &[String]) -> Option<&'static str> {
    let sub = operands(args).next().unwrap_or_default();
    let sub2 = operands(args).nth(1).unwrap_or_default();
    let rule = match name {
        "rm" => {
            let recursive = has_short(args, 'r') || has_short(args, 'R') || has_long(args, "--recursive");
            if recursive && (has_long(args, "--no-preserve-root") || operands(args).any(is_system_root)) {
                "shell_rm_root"
            } else if recursive {
                "shell_rm_rf"
            } else {
                "shell_rm"
            }
        }
        "find" if has_long(args, "-delete") => "shell_find_delete",
        "find" if args.windows(2).any(|w| matches!(w[0].as_str(), "-exec" | "-execdir") && program(&w[1]) == "rm") => {
            "shell_find_delete"
        }
        "dd" if args.iter().any(|a| a.strip_prefix("of=").is_some_and(is_block_device)) => "shell_device_write",
        n if n.starts_with("mkfs") => "shell_disk_format",
        "mke2fs" | "mkswap" | "wipefs" | "fdisk" | "sfdisk" | "cfdisk" | "parted" | "sgdisk" | "gdisk"
        | "blkdiscard" | "shred"
            if !has_short(args, 'l') || name == "shred" =>
        {
            "shell_disk_format"
        }
        "shutdown" | "reboot" | "halt" | "poweroff" => "shell_shutdown",
        "init" | "telinit" if matches!(sub, "0" | "6") => "shell_shutdown",
        "iptables" | "ip6tables" | "iptables-legacy" | "iptables-nft"
            if has_short(args, 'F') || has_short(args, 'X') || has_long(args, "--flush") =>
        {
            "shell_firewall_flush"
        }
        "nft" if sub == "flush" || (sub == "delete" && sub2 == "table") => "shell_firewall_flush",
        "ufw" if matches!(sub, "disable" | "reset") => "shell_firewall_flush",
        "chmod" => {
            let world =
                operands(args).next().is_some_and(|m| matches!(m, "777" | "0777" | "a+rwx" | "ugo+rwx" | "o+w"));
            let recursive = has_short(args, 'R') || has_long(args, "--recursive");
            match (world, recursive) {
                (true, true) => "shell_chmod_777",
                (true, false) => "shell_chmod_world",
                _ => return None,
            }
        }
        "kill" | "pkill" | "killall" => "shell_kill",
        "systemctl" => match sub {
            "poweroff" | "reboot" | "halt" | "kexec" => "shell_shutdown",
            "stop" | "restart" | "disable" | "mask" | "kill" | "try-restart" | "reload-or-restart" => {
                "shell_service_change"
            }
            _ => return None,
        },
        "service" if matches!(sub2, "stop" | "restart") => "shell_service_change",
        "docker" | "podman" | "nerdctl" | "crictl" => {
            let op = if matches!(sub, "container" | "image" | "volume" | "network" | "system") { sub2 } else { sub };
            match op {
                "rm" | "rmi" | "prune" | "rmp" => "container_destroy",
                "stop" | "kill" | "restart" | "stopp" => "container_stop",
                _ => return None,
            }
        }
        "cat" | "less" | "more" | "head" | "tail" | "base64" | "strings" | "xxd" | "cp" | "scp" | "openssl"
            if operands(args).any(is_secret_file) =>
        {
            "secret_file_read"
        }
        "vault" if (sub == "read") || (sub == "kv" && sub2 == "get") => "secret_read",
        "aws" if sub == "secretsmanager" && sub2 == "get-secret-value" => "secret_read",
        "aws" if sub == "ssm" && sub2 == "get-parameter" && has_long(args, "--with-decryption") => "secret_read",
        "gcloud" if args.windows(3).any(|w| w[0] == "secrets" && w[1] == "versions" && w[2] == "access") => {
            "secret_read"
        }
        "az" if args.windows(3).any(|w| w[0] == "keyvault" && w[1] == "secret" && w[2] == "show") => "secret_read",
        "aws" if sub == "s3" && sub2 == "rm" && has_long(args, "--recursive") => "cloud_delete",
        "aws" | "gcloud" | "az" | "doctl"
            if operands(args)
                .any(|w| w == "delete" || w == "rb" || w.starts_with("delete-") || w.starts_with("terminate-")) =>
        {
            "cloud_delete"
        }
        "terraform" | "tofu" if sub == "destroy" => "terraform_destroy",
        "terraform" | "tofu" if sub == "apply" && args.iter().any(|a| a == "-destroy") => "terraform_destroy",
        "terraform" | "tofu" if sub == "apply" => "terraform_apply",
        "etcdctl" if matches!(sub, "del" | "delete") => "etcd_delete",
        "redis-cli" if args.iter().any(|a| a.eq_ignore_ascii_case("flushall") || a.eq_ignore_ascii_case("flushdb")) => {
            "redis_flush"
        }
        _ => return None,
    };
    Some(rule)
}
