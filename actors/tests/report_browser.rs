//! `dreamloop report` in a real headless browser (Debian's chromium): a short scheduled run
//! with generation probes, its page rendered (the DOM the browser built holds every chart
//! and the generations) and a screenshot taken. `scripts/test.sh` installs chromium and sets
//! DREAMLOOP_REQUIRE_CHROMIUM=1, so in CI a missing browser fails instead of skipping.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{config_text, noise_proof_rollback, Daemon, Overrides};

const LIMIT: Duration = Duration::from_secs(300);

fn chromium() -> Option<PathBuf> {
    let found = ["chromium", "chromium-browser", "google-chrome"]
        .iter()
        .map(|name| Path::new("/usr/bin").join(name))
        .find(|p| p.exists());
    if found.is_none() {
        assert!(
            std::env::var_os("DREAMLOOP_REQUIRE_CHROMIUM").is_none(),
            "chromium is required (DREAMLOOP_REQUIRE_CHROMIUM=1) but not installed"
        );
        eprintln!("note: chromium not found; skipping (scripts/test.sh installs it)");
    }
    found
}

/// chromium headless with a throw-away profile; `--no-sandbox` because CI runs as root.
fn browser(bin: &Path, profile: &Path) -> Command {
    let mut cmd = Command::new(bin);
    cmd.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--hide-scrollbars",
    ])
    .arg(format!("--user-data-dir={}", profile.display()));
    cmd
}

#[test]
fn the_report_renders_in_chromium() {
    let Some(bin) = chromium() else { return };
    let o = Overrides {
        eval: "every_n_steps = 2\ngeneration_prompts = 1\ngeneration_tokens = 12".into(),
        checkpoint: "every_n_steps = 2".into(),
        rollback: noise_proof_rollback(),
        ..Overrides::default()
    };
    let mut d = Daemon::new(&o);
    let schedule = "[[phase]]\nkind = \"sft\"\nuntil = { steps = 3 }\n\n\
                    [[phase]]\nkind = \"dpo\"\nlr = 5e-7\n";
    let text = config_text(&d.state(), &o)
        .replacen("phase = \"sft\"\n", "", 1)
        .replacen("[model]", &format!("{schedule}\n[model]"), 1);
    std::fs::write(d.config(), text).unwrap();
    d.start(&["--max-steps", "6"], &[]);
    assert!(d.wait_exit(LIMIT).success(), "{}", d.log());

    let out = tempfile::tempdir().unwrap();
    let page = out.path().join("report.html");
    let status = Command::new(env!("CARGO_BIN_EXE_dreamloop"))
        .arg("report")
        .arg("--state-dir")
        .arg(d.state())
        .arg("--out")
        .arg(&page)
        .status()
        .unwrap();
    assert!(status.success());
    let url = format!("file://{}", page.display());

    // The DOM the browser built from the page.
    let dom = browser(&bin, &out.path().join("profile-dom"))
        .arg("--dump-dom")
        .arg(&url)
        .output()
        .expect("run chromium");
    let dom = String::from_utf8_lossy(&dom.stdout);
    assert_eq!(dom.matches("<svg class=\"chart\"").count(), 8, "{dom}");
    assert!(dom.contains("<polyline"), "lines drawn");
    assert!(dom.contains("→ dpo"), "the phase change is marked");
    assert!(dom.contains("Generations: step 0 and step 6"), "{dom}");

    // A screenshot: a PNG of the page as drawn.
    let shot = out.path().join("report.png");
    let run = browser(&bin, &out.path().join("profile-shot"))
        .arg(format!("--screenshot={}", shot.display()))
        .arg("--window-size=1240,2400")
        .arg(&url)
        .output()
        .expect("run chromium");
    let png = std::fs::read(&shot).unwrap_or_else(|e| {
        panic!(
            "no screenshot ({e}): {}",
            String::from_utf8_lossy(&run.stderr)
        )
    });
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    assert!(
        png.len() > 20_000,
        "a drawn page, not a blank one: {} bytes",
        png.len()
    );
    if let Some(keep) = std::env::var_os("DREAMLOOP_REPORT_SHOT") {
        std::fs::copy(&shot, keep).unwrap();
        std::fs::copy(
            &page,
            Path::new(&std::env::var_os("DREAMLOOP_REPORT_SHOT").unwrap()).with_extension("html"),
        )
        .unwrap();
    }
}
