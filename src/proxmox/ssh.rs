//! Running a command on a PVE node over SSH (the OpenSSH client), for what
//! the API refuses: `vzdump --stdout` and `qmrestore -` (PLATFORM.md).
//!
//! Host keys are pinned: only the platform file's `known_hosts` is read
//! (`StrictHostKeyChecking=yes`, no global file, nothing learned), the key
//! file must be private, `BatchMode` forbids any prompt, and the user's own
//! `~/.ssh/config` is not read (`-F /dev/null`). The key's *path* is in
//! argv, never its contents.

use super::platform::SshConfig;
use crate::error::LabError;

/// The `ssh` argv that runs `remote` (program and arguments, each quoted
/// for the remote shell) on `node`.
///
/// # Errors
/// A key error for a missing or too-open key file; a usage error for a
/// missing known_hosts file.
pub fn command(cfg: &SshConfig, node: &str, remote: &[String]) -> Result<Vec<String>, LabError> {
    let meta = std::fs::metadata(&cfg.identity_file).map_err(|e| {
        LabError::key(format!(
            "SSH key file {} (ssh.identity_file): {e}",
            cfg.identity_file.display()
        ))
    })?;
    crate::util::secret::check_private(&cfg.identity_file, &meta)?;
    if !cfg.known_hosts.is_file() {
        return Err(LabError::usage(format!(
            "the pinned host keys {} (ssh.known_hosts) do not exist: collect them once with \
             `ssh-keyscan NODE >> FILE`, check the fingerprints on the node's console, and keep the file",
            cfg.known_hosts.display()
        )));
    }
    let host = cfg.hosts.get(node).map(String::as_str).unwrap_or(node);
    let opt = |k: &str, v: &str| ["-o".to_string(), format!("{k}={v}")];
    let mut argv = vec!["ssh".to_string(), "-F".into(), "/dev/null".into()];
    argv.extend(opt("BatchMode", "yes"));
    argv.extend(opt("StrictHostKeyChecking", "yes"));
    argv.extend(opt(
        "UserKnownHostsFile",
        &cfg.known_hosts.display().to_string(),
    ));
    argv.extend(opt("GlobalKnownHostsFile", "/dev/null"));
    argv.extend(opt("IdentitiesOnly", "yes"));
    argv.extend(opt(
        "IdentityFile",
        &cfg.identity_file.display().to_string(),
    ));
    argv.extend(opt("ConnectTimeout", &cfg.connect_timeout_secs.to_string()));
    argv.extend(opt("ServerAliveInterval", "15"));
    argv.extend(opt("ServerAliveCountMax", "4"));
    argv.extend(opt("LogLevel", "ERROR"));
    argv.extend([
        "-p".into(),
        cfg.port.to_string(),
        "-l".into(),
        cfg.user.clone(),
        "--".into(),
        host.to_string(),
    ]);
    argv.push(
        remote
            .iter()
            .map(|a| quote(a))
            .collect::<Vec<_>>()
            .join(" "),
    );
    Ok(argv)
}

/// `a` quoted for a POSIX shell.
fn quote(a: &str) -> String {
    if !a.is_empty()
        && a.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@".contains(c))
    {
        return a.to_string();
    }
    format!("'{}'", a.replace('\'', r"'\''"))
}

/// Whether a failure's text is the ssh client's own (no connection, host
/// key, authentication), not the remote command's (both exit 255).
pub fn is_ssh_error(message: &str) -> bool {
    [
        "Host key verification failed",
        "REMOTE HOST IDENTIFICATION HAS CHANGED",
        "host key is known",
        "Permission denied (",
        "ssh: connect to host",
        "ssh: Could not resolve",
        "kex_exchange_identification",
        "Connection closed by",
        "Connection timed out",
        "Connection refused",
    ]
    .iter()
    .any(|p| message.contains(p))
}

/// Turns an ssh failure (its stderr's last line) into a classified error
/// naming the node: a host key that does not match the pinned one is a key
/// error (exit 5); no connection is a failure (exit 1).
pub fn classify(node: &str, message: &str) -> LabError {
    if message.contains("Host key verification failed")
        || message.contains("REMOTE HOST IDENTIFICATION HAS CHANGED")
        || message.contains("No ED25519 host key is known")
        || message.contains("host key is known")
    {
        return LabError::key(format!(
            "node {node}'s SSH host key is not the pinned one in ssh.known_hosts: refusing to talk to it ({message})"
        ));
    }
    if message.contains("Permission denied") {
        return LabError::key(format!(
            "node {node} refused the SSH key (ssh.identity_file): {message}"
        ));
    }
    LabError::failed(format!("on node {node} over SSH: {message}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arguments_are_quoted_for_the_remote_shell() {
        assert_eq!(quote("vzdump"), "vzdump");
        assert_eq!(quote("a b"), "'a b'");
        assert_eq!(quote("it's"), r"'it'\''s'");
        assert_eq!(quote(""), "''");
        assert_eq!(quote("$(reboot)"), "'$(reboot)'");
    }
}
