//! Operator notifications: every failure, promotion and restart is a log line naming the event,
//! and runs the configured notify command (if any) with the details in environment variables.

use std::process::Stdio;

/// Events that are the service working as intended (a replica joined, a backup is in sync):
/// logged as INFO. Every other event reports a failure or what was done about one: WARN.
pub const INFO_EVENTS: &[&str] = &[
    "primary-registered",
    "backup-registered",
    "backup-start",
    "backup-wait",
    "backup-synced",
    "learning-epochs",
    "epochs-learned",
];

/// Logs `kind` (INFO for [`INFO_EVENTS`], else WARN) and runs `command` (via `sh -c`) with
/// TS_EVENT_KIND, TS_EVENT_DETAIL, TS_EVENT_PROCESS and TS_EVENT_TIME set. Never blocks: the
/// command runs detached and is reaped by a background thread.
pub fn notify(command: Option<&str>, process: &str, kind: &str, detail: &str) {
    if INFO_EVENTS.contains(&kind) {
        tracing::info!(event = kind, process, "{detail}");
    } else {
        tracing::warn!(event = kind, process, "{detail}");
    }
    let Some(cmd) = command else { return };
    let time = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    match std::process::Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .env("TS_EVENT_KIND", kind)
        .env("TS_EVENT_DETAIL", detail)
        .env("TS_EVENT_PROCESS", process)
        .env("TS_EVENT_TIME", time.to_string())
        .stdin(Stdio::null())
        .spawn()
    {
        Ok(mut child) => {
            std::thread::spawn(move || {
                let _ = child.wait();
            });
        }
        Err(e) => tracing::error!("cannot run notify command `{cmd}`: {e}; check notify_command"),
    }
}
