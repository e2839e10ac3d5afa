//! `tuplespace completions SHELL` prints a completion script (clap_complete) that knows every
//! subcommand of `tuplespace --help`.

use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_tuplespace");

/// The subcommands `tuplespace --help` lists (its "Commands:" section), without `help`.
fn subcommands() -> Vec<String> {
    let out = Command::new(BIN)
        .arg("--help")
        .output()
        .expect("run --help");
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).expect("utf-8 help");
    let section = text
        .split("Commands:")
        .nth(1)
        .expect("a Commands: section in --help");
    let mut names = Vec::new();
    for line in section.lines().skip(1) {
        // Entries are indented two spaces; the section ends at the first line that is not.
        let Some(entry) = line.strip_prefix("  ") else {
            break;
        };
        if entry.starts_with(' ') {
            continue; // a wrapped description
        }
        let name = entry.split_whitespace().next().unwrap_or_default();
        if !name.is_empty() && name != "help" {
            names.push(name.to_owned());
        }
    }
    names
}

#[test]
fn each_shell_gets_a_script_with_every_subcommand() {
    let subs = subcommands();
    for want in ["proxy", "server", "client", "up", "completions"] {
        assert!(
            subs.iter().any(|s| s == want),
            "--help lacks {want}: {subs:?}"
        );
    }
    for shell in ["bash", "zsh", "fish"] {
        let out = Command::new(BIN)
            .args(["completions", shell])
            .output()
            .expect("run completions");
        let script = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "completions {shell} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(script.len() > 1000, "{shell}: only {} bytes", script.len());
        for s in &subs {
            // How each generator offers a subcommand (clap_complete 4.6).
            let offered = match shell {
                "bash" => format!("tuplespace,{s})"),
                "zsh" => format!("'{s}:"),
                _ => format!("-a \"{s}\""),
            };
            assert!(
                script.contains(&offered),
                "{shell} script does not offer `{s}` (no `{offered}`)"
            );
        }
        // Global flags and one subcommand's own flag are completed too.
        for flag in ["certs", "config", "admin-sap"] {
            assert!(
                script.contains(flag),
                "{shell} script does not mention --{flag}"
            );
        }
    }
}

#[test]
fn an_unknown_shell_is_refused_with_the_choices() {
    let out = Command::new(BIN)
        .args(["completions", "tcsh"])
        .output()
        .expect("run completions");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("bash") && err.contains("zsh") && err.contains("fish"),
        "{err}"
    );
}
