//! README.md documents every option, subcommand and signal the binary has, and each
//! help text stands on its own (it says what the thing is for, with a usage line).

mod common;

use std::process::Command;

use common::*;

fn help(args: &[&str]) -> String {
    let out = Command::new(recluster_bin()).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The long options a help text lists (`--name`), but `--help` and `--version`.
fn long_options(help: &str) -> Vec<String> {
    help.lines()
        .filter_map(|l| {
            let l = l.trim_start();
            let l = l
                .strip_prefix("-")
                .and_then(|r| r.split_once(", "))
                .map_or(l, |(_, r)| r);
            let name = l.strip_prefix("--")?.split([' ', '=', '[']).next()?;
            (!["help", "version"].contains(&name)).then(|| format!("--{name}"))
        })
        .collect()
}

#[test]
fn every_option_subcommand_and_signal_is_in_the_readme() {
    let readme = std::fs::read_to_string(manifest_dir().join("README.md")).unwrap();
    let main = help(&["--help"]);
    let options = long_options(&main);
    assert!(options.len() >= 25, "{options:?}");
    for o in &options {
        assert!(
            readme.contains(&format!("`{o}")),
            "README.md's tables lack {o}"
        );
    }
    for sub in ["status", "reload", "scale", "stop"] {
        assert!(main.contains(&format!("  {sub} ")), "--help lists {sub}");
        assert!(
            readme.contains(&format!("`recluster {sub}")),
            "README.md lacks `recluster {sub}`"
        );
        let text = help(&[sub, "--help"]);
        assert!(text.contains(&format!("Usage: recluster {sub}")), "{text}");
        assert!(
            text.lines().next().is_some_and(|l| l.len() > 20),
            "{sub} --help starts with what it does: {text}"
        );
        for o in long_options(&text) {
            assert!(readme.contains(o.as_str()), "README.md lacks {sub}'s {o}");
        }
    }
    let signals = readme.split("## Signals").nth(1).unwrap();
    for s in [
        "SIGUSR2", "SIGHUP", "SIGTERM", "SIGINT", "SIGTTIN", "SIGTTOU",
    ] {
        assert!(
            signals.contains(&format!("`{s}`")),
            "the Signals table lacks {s}"
        );
        assert!(main.contains(&s[3..]), "--help names {s}");
    }
}
