//! The metric catalogue against its naming rule (src/metrics.rs, DESIGN.md §7) and against
//! what the ops files query: every metric name in `grafana/dashboards/*.json` and
//! `grafana/alerts/*.yml` must be in the catalogue, and the dashboard must be provisionable
//! with a units-bearing panel for everything it shows.

use std::collections::{BTreeSet, HashSet};
use std::fs;
use std::path::{Path, PathBuf};

use dreamloop::metrics::{
    find, labels, Label, LabelValues, MetricDef, MetricKind, Unit, CATALOGUE, SUBSYSTEMS,
};
use dreamloop::rollback::{PauseReason, RollbackReason};

/// Unit words that are not Prometheus base units (or are spelled in a non-base way).
const NON_BASE_UNITS: &[&str] = &[
    "_milliseconds",
    "_microseconds",
    "_nanoseconds",
    "_ms",
    "_us",
    "_minutes",
    "_hours",
    "_days",
    "_percent",
    "_kilobytes",
    "_megabytes",
    "_gigabytes",
    "_bits",
];

/// Label names that would make a metric unbounded (one series per example or step).
const UNBOUNDED_LABELS: &[&str] = &[
    "step",
    "id",
    "example",
    "example_id",
    "hash",
    "prompt",
    "scenario",
    "path",
    "file",
    "checkpoint",
];

/// Every way `def` breaks the naming and labelling rules; empty when it follows them.
fn rule_violations(def: &MetricDef) -> Vec<String> {
    let mut out = Vec::new();
    let name = def.name;
    let mut fail = |why: &str| out.push(format!("{name}: {why}"));
    if !name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        || name.contains("__")
        || name.ends_with('_')
    {
        fail("must be lower_snake_case [a-z0-9_] without doubled or trailing underscores");
    }
    let Some(rest) = name.strip_prefix("dreamloop_") else {
        fail("must start with the `dreamloop_` namespace");
        return out;
    };
    match rest.split_once('_') {
        Some((subsystem, _)) if SUBSYSTEMS.contains(&subsystem) => {}
        Some((subsystem, _)) => fail(&format!("subsystem `{subsystem}` is not in SUBSYSTEMS")),
        None => fail("needs a subsystem and a name after the namespace"),
    }
    let is_counter = def.kind == MetricKind::Counter;
    if is_counter != name.ends_with("_total") {
        fail("`_total` belongs on counters and only on counters");
    }
    let base = name.strip_suffix("_total").unwrap_or(name);
    for reserved in ["_bucket", "_sum", "_count", "_created"] {
        if base.ends_with(reserved) {
            fail(&format!(
                "ends with `{reserved}`, which Prometheus derives itself"
            ));
        }
    }
    let identity = [[labels::VERSION].as_slice(), [labels::RUN_ID].as_slice()];
    if base.ends_with("_info") && !(def.kind == MetricKind::Gauge && identity.contains(&def.labels))
    {
        fail("`_info` is only for a gauge of 1 carrying the version or the run id label");
    }
    for type_word in ["_counter", "_gauge", "_histogram"] {
        if base.contains(type_word) {
            fail("the metric type does not belong in the name");
        }
    }
    match def.unit.suffix() {
        Some(unit) if !base.ends_with(unit) => {
            fail(&format!(
                "unit {:?} needs the name to end in `{unit}`",
                def.unit
            ));
        }
        Some(_) => {}
        None => {
            for unit in [Unit::Seconds, Unit::Bytes, Unit::Ratio] {
                let word = unit.suffix().expect("these units have a word");
                if base.ends_with(word) {
                    fail(&format!("ends in `{word}` but is declared dimensionless"));
                }
            }
        }
    }
    for unit in NON_BASE_UNITS {
        if base.ends_with(unit) || base.contains(&format!("{unit}_")) {
            fail(&format!(
                "`{unit}` is not a base unit (seconds, bytes, ratio)"
            ));
        }
    }
    if def.help.is_empty() || !def.help.ends_with('.') || def.help.contains('\n') {
        fail("help must be one sentence ending with a full stop");
    }
    let mut seen = HashSet::new();
    for label in def.labels {
        out.extend(label_violations(name, label));
        if !seen.insert(label.name) {
            out.push(format!("{name}: label `{}` twice", label.name));
        }
    }
    out
}

/// Every way `label` of metric `name` is malformed or unbounded.
fn label_violations(name: &str, label: &Label) -> Vec<String> {
    let mut out = Vec::new();
    let l = label.name;
    if l.is_empty()
        || l.starts_with("__")
        || !l.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')
    {
        out.push(format!("{name}: label `{l}` must be lower_snake_case"));
    }
    if l == "le" || l == "quantile" {
        out.push(format!(
            "{name}: label `{l}` is reserved for histograms/summaries"
        ));
    }
    if UNBOUNDED_LABELS.contains(&l) {
        out.push(format!(
            "{name}: label `{l}` has one value per example or step"
        ));
    }
    match label.values {
        LabelValues::OneOf(values) => {
            if values.is_empty() {
                out.push(format!("{name}: label `{l}` has no values"));
            }
            for v in values {
                if v.is_empty()
                    || !v
                        .bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
                {
                    out.push(format!("{name}: label `{l}` value `{v}` is not snake_case"));
                }
            }
        }
        LabelValues::LayerIndex if l != "layer" => {
            out.push(format!("{name}: a layer index must be the `layer` label"));
        }
        LabelValues::Version if l != "version" => {
            out.push(format!("{name}: a version must be the `version` label"));
        }
        LabelValues::RunId if l != "run_id" => {
            out.push(format!("{name}: a run id must be the `run_id` label"));
        }
        LabelValues::LayerIndex | LabelValues::Version | LabelValues::RunId => {}
    }
    out
}

#[test]
fn catalogue_names_are_unique() {
    let mut seen = HashSet::new();
    for def in CATALOGUE {
        assert!(
            seen.insert(def.name),
            "{} is in the catalogue twice",
            def.name
        );
    }
    // The catalogue covers DESIGN.md §7's subsystems: a truncated list fails here.
    assert!(
        CATALOGUE.len() >= 45,
        "catalogue has {} entries",
        CATALOGUE.len()
    );
}

#[test]
fn catalogue_follows_the_naming_rule() {
    let violations: Vec<String> = CATALOGUE.iter().flat_map(rule_violations).collect();
    assert!(violations.is_empty(), "{}", violations.join("\n"));
}

#[test]
fn naming_rule_rejects_bad_names() {
    // The rule must be able to fail: each of these breaks exactly one part of it.
    let bad = [
        (
            "dreamloop_train_steps",
            MetricKind::Counter,
            Unit::Dimensionless,
            &[][..],
        ),
        (
            "dreamloop_train_loss_total",
            MetricKind::Gauge,
            Unit::Dimensionless,
            &[][..],
        ),
        (
            "dreamloop_train_step_duration_ms",
            MetricKind::Histogram,
            Unit::Seconds,
            &[][..],
        ),
        (
            "dreamloop_eval_accuracy_percent",
            MetricKind::Gauge,
            Unit::Ratio,
            &[][..],
        ),
        (
            "dreamloop_eval_accuracy_ratio",
            MetricKind::Gauge,
            Unit::Dimensionless,
            &[][..],
        ),
        (
            "dreamloop_bogus_loss",
            MetricKind::Gauge,
            Unit::Dimensionless,
            &[][..],
        ),
        (
            "train_loss",
            MetricKind::Gauge,
            Unit::Dimensionless,
            &[][..],
        ),
        (
            "dreamloop_checkpoint_size_count",
            MetricKind::Gauge,
            Unit::Dimensionless,
            &[][..],
        ),
        (
            "dreamloop_train_info",
            MetricKind::Gauge,
            Unit::Dimensionless,
            &[][..],
        ),
        (
            "dreamloop_train_examples_total",
            MetricKind::Counter,
            Unit::Dimensionless,
            &[Label {
                name: "step",
                values: LabelValues::LayerIndex,
            }][..],
        ),
    ];
    for (name, kind, unit, labels) in bad {
        let def = MetricDef {
            name,
            kind,
            help: "A test metric.",
            unit,
            labels,
        };
        assert!(!rule_violations(&def).is_empty(), "{name} passed the rule");
    }
}

#[test]
fn label_values_match_the_policy_enums() {
    let reasons: Vec<&str> = RollbackReason::ALL.iter().map(|r| r.label()).collect();
    assert_eq!(
        labels::ROLLBACK_REASON.values,
        LabelValues::OneOf(&[
            "non_finite",
            "sycophancy",
            "perplexity",
            "clear_direction",
            "general_probe"
        ])
    );
    for reason in &reasons {
        assert!(labels::ROLLBACK_REASON.allows(reason), "{reason}");
    }
    let pauses = [
        PauseReason::TooManyRollbacks {
            rollbacks: 3,
            window_evals: 10,
        },
        PauseReason::NoRollbackTarget {
            reason: RollbackReason::NonFinite,
        },
        PauseReason::BaselineNotFinite,
    ];
    let LabelValues::OneOf(pause_values) = labels::PAUSE_REASON.values else {
        panic!("pause reasons are an enumeration");
    };
    assert_eq!(pause_values.len(), pauses.len());
    for pause in pauses {
        assert!(
            labels::PAUSE_REASON.allows(pause.label()),
            "{}",
            pause.label()
        );
    }
    assert!(labels::LAYER.allows("0") && labels::LAYER.allows("47"));
    assert!(!labels::LAYER.allows("-1") && !labels::LAYER.allows("x") && !labels::LAYER.allows(""));
}

/// The repository root (the core crate's manifest directory).
fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Files in `dir` whose name ends with `suffix`, sorted; fails if there are none.
fn files(dir: &str, suffix: &str) -> Vec<PathBuf> {
    let dir = root().join(dir);
    let mut out: Vec<PathBuf> = fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.expect("directory entry").path())
        .filter(|p| p.to_string_lossy().ends_with(suffix))
        .collect();
    out.sort();
    assert!(!out.is_empty(), "no *{suffix} in {}", dir.display());
    out
}

/// Every `dreamloop_[a-z0-9_]+` token in `text` (not preceded by a name character).
fn metric_tokens(text: &str) -> BTreeSet<String> {
    let bytes = text.as_bytes();
    let is_name = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_';
    let mut out = BTreeSet::new();
    for (start, _) in text.match_indices("dreamloop_") {
        if start > 0 && (is_name(bytes[start - 1]) || bytes[start - 1].is_ascii_uppercase()) {
            continue;
        }
        let end = bytes[start..]
            .iter()
            .position(|&b| !is_name(b))
            .map_or(bytes.len(), |n| start + n);
        out.insert(text[start..end].to_string());
    }
    out
}

/// The catalogue metric a queried series name belongs to: itself, or the histogram whose
/// `_bucket`/`_sum`/`_count` series it is.
fn catalogued(series: &str) -> Option<&'static MetricDef> {
    find(series).or_else(|| {
        ["_bucket", "_sum", "_count"].iter().find_map(|suffix| {
            series
                .strip_suffix(suffix)
                .and_then(find)
                .filter(|def| def.kind == MetricKind::Histogram)
        })
    })
}

/// Names used in `paths` that are not in the catalogue, and all names used.
fn check_names(paths: &[PathBuf]) -> (Vec<String>, BTreeSet<String>) {
    let mut unknown = Vec::new();
    let mut used = BTreeSet::new();
    for path in paths {
        let text = fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        for token in metric_tokens(&text) {
            if catalogued(&token).is_none() {
                unknown.push(format!("{}: {token}", path.display()));
            }
            used.insert(token);
        }
    }
    (unknown, used)
}

#[test]
fn token_extraction_finds_names_and_histogram_series() {
    let tokens = metric_tokens(
        r#"rate(dreamloop_train_steps_total[5m]) / x_dreamloop_not "dreamloop-main" Dreamloop_No
           histogram_quantile(0.9, rate(dreamloop_eval_duration_seconds_bucket[1h]))"#,
    );
    let expected: BTreeSet<String> = [
        "dreamloop_train_steps_total",
        "dreamloop_eval_duration_seconds_bucket",
    ]
    .map(String::from)
    .into();
    assert_eq!(tokens, expected);
    assert!(catalogued("dreamloop_eval_duration_seconds_bucket").is_some());
    assert!(
        catalogued("dreamloop_train_loss_sum").is_none(),
        "loss is a gauge"
    );
    assert!(catalogued("dreamloop_train_lossy").is_none());
}

#[test]
fn dashboards_and_alerts_use_only_catalogued_metrics() {
    let mut paths = files("grafana/dashboards", ".json");
    paths.extend(files("grafana/alerts", ".yml"));
    let (unknown, used) = check_names(&paths);
    assert!(
        unknown.is_empty(),
        "not in src/metrics.rs:\n{}",
        unknown.join("\n")
    );
    assert!(used.len() >= 20, "the ops files use only {used:?}");
}

#[test]
fn metrics_source_names_only_catalogued_metrics() {
    // Every name string in src/metrics.rs is a catalogue entry (no orphan constants); the
    // docs' `dreamloop_<subsystem>` prose is not a string literal.
    let text = fs::read_to_string(root().join("src/metrics.rs")).unwrap();
    let literals: Vec<&str> = text
        .split('"')
        .skip(1)
        .step_by(2)
        .filter(|s| s.starts_with("dreamloop_"))
        .collect();
    assert!(
        literals.len() >= CATALOGUE.len(),
        "{} name literals",
        literals.len()
    );
    let orphans: Vec<&&str> = literals
        .iter()
        .filter(|name| find(name).is_none())
        .collect();
    assert!(orphans.is_empty(), "not in CATALOGUE: {orphans:?}");
}

/// All panels of a dashboard, rows' nested panels included.
fn panels(value: &serde_json::Value) -> Vec<&serde_json::Value> {
    let mut out = Vec::new();
    for panel in value["panels"].as_array().into_iter().flatten() {
        out.push(panel);
        out.extend(panels(panel));
    }
    out
}

#[test]
fn dashboard_is_provisionable_with_units_everywhere() {
    for path in files("grafana/dashboards", ".json") {
        let text = fs::read_to_string(&path).expect("readable dashboard");
        let dash: serde_json::Value =
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let where_ = path.display();
        assert!(
            dash["uid"].as_str().is_some_and(|u| !u.is_empty()),
            "{where_}: uid"
        );
        let vars = dash["templating"]["list"]
            .as_array()
            .expect("templating.list");
        assert!(
            vars.iter().any(|v| v["name"] == "datasource"
                && v["type"] == "datasource"
                && v["query"] == "prometheus"),
            "{where_}: a `datasource` variable of type datasource (prometheus)"
        );
        let all = panels(&dash);
        let data_panels: Vec<_> = all.iter().filter(|p| p["type"] != "row").collect();
        assert!(
            data_panels.len() >= 10,
            "{where_}: {} panels",
            data_panels.len()
        );
        let mut ids = HashSet::new();
        for panel in &all {
            let title = panel["title"].as_str().unwrap_or("<untitled>");
            let id = panel["id"].as_u64().expect("every panel has a numeric id");
            assert!(ids.insert(id), "{where_}: panel id {id} twice");
            if panel["type"] == "row" {
                // A row only groups panels; it shows no data, so it has no unit.
                continue;
            }
            let unit = panel["fieldConfig"]["defaults"]["unit"].as_str();
            assert!(
                unit.is_some_and(|u| !u.is_empty()),
                "{where_}: `{title}` has no unit"
            );
            assert_eq!(
                panel["datasource"]["uid"], "${datasource}",
                "{where_}: `{title}` datasource"
            );
            let targets = panel["targets"].as_array().expect("targets");
            assert!(!targets.is_empty(), "{where_}: `{title}` has no query");
            for target in targets {
                assert_eq!(
                    target["datasource"]["uid"], "${datasource}",
                    "{where_}: `{title}`"
                );
                let expr = target["expr"].as_str().unwrap_or("");
                assert!(
                    !metric_tokens(expr).is_empty(),
                    "{where_}: `{title}` queries no dreamloop metric: {expr}"
                );
            }
        }
    }
    let main = fs::read_to_string(root().join("grafana/dashboards/dreamloop.json")).unwrap();
    let main: serde_json::Value = serde_json::from_str(&main).unwrap();
    assert_eq!(main["uid"], "dreamloop-main");
}

/// `alert: Name` lines of a rules file.
fn alert_names(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter_map(|l| {
            l.trim()
                .strip_prefix("- alert:")
                .or(l.trim().strip_prefix("alert:"))
        })
        .map(|name| name.trim().to_string())
        .collect()
}

#[test]
fn every_alert_has_unit_tests() {
    let rules = fs::read_to_string(root().join("grafana/alerts/dreamloop-rules.yml")).unwrap();
    let tests = fs::read_to_string(root().join("grafana/alerts/dreamloop-rules.test.yml")).unwrap();
    let alerts = alert_names(&rules);
    assert!(alerts.len() >= 4, "{alerts:?}");
    for alert in &alerts {
        let evals = tests.matches(&format!("alertname: {alert}\n")).count();
        // One case where it fires and one where it does not, at least.
        assert!(evals >= 2, "{alert}: {evals} alert_rule_test cases");
    }
    assert!(Path::new(&root().join("grafana/README.md")).exists());
}
