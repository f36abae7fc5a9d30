//! `dreamloop report`: one self-contained HTML page of a run, from its history
//! (`evals.jsonl`, `generations.jsonl`, `events.jsonl`, `run.json`; [`crate::history`]).
//! Plots are inline SVG, no script, no network: the page opens from a file anywhere.
//!
//! The x axis of every plot is the evaluation's order in the run (step numbers rewind on a
//! rollback; the evaluation count never does), labelled with the step evaluated. Rollbacks
//! and phase changes are vertical marks at the first evaluation after them.
//!
//! The SVG is written here rather than with a plotting crate: `plotters` lays out every
//! label with a font implementation of its own (`ttf` reads the system's fonts through
//! fontconfig, absent on a bare training box; `ab_glyph` needs a font file bundled in the
//! binary), while an SVG `<text>` element is laid out by the browser that shows the page.
//! A line chart with axes, ticks, a legend and marks is the whole need (~150 lines).

use std::fmt::Write;

use crate::eval::generations::GenKind;
use crate::events::Event;
use crate::events::EventRecord;
use crate::history::{EvalEntry, GenerationsEntry, RunInfo};

/// Colours of successive series (a colour-blind-safe palette, Okabe–Ito).
const COLOURS: [&str; 8] = [
    "#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000", "#F0E442",
];

/// One line of a chart: its name and a value per evaluation (NaN: none).
struct Series {
    name: String,
    values: Vec<f64>,
}

/// A vertical mark: at evaluation index `at`, with a short label.
struct Mark {
    at: usize,
    label: String,
    colour: &'static str,
}

/// Escapes text for HTML and SVG.
fn esc(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A readable number for a tick: few digits, scientific for small learning rates.
fn tick(v: f64) -> String {
    let a = v.abs();
    if a != 0.0 && !(1e-3..1e5).contains(&a) {
        format!("{v:.1e}")
    } else if a >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.3}")
            .trim_end_matches('0')
            .trim_end_matches('.')
            .to_string()
    }
}

/// An SVG line chart of `series` over evaluations `0..n`, x ticks labelled with `steps`.
fn chart(title: &str, series: &[Series], steps: &[u64], marks: &[Mark]) -> String {
    const W: f64 = 560.0;
    const H: f64 = 262.0;
    const L: f64 = 64.0;
    const R: f64 = 12.0;
    const T: f64 = 28.0;
    const B: f64 = 74.0;
    let n = steps.len().max(1);
    let finite: Vec<f64> = series
        .iter()
        .flat_map(|s| s.values.iter().copied())
        .filter(|v| v.is_finite())
        .collect();
    let mut svg = String::new();
    let _ = write!(
        svg,
        r#"<svg class="chart" xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" role="img"><title>{t}</title><text x="{L}" y="18" font-size="14" font-weight="bold">{t}</text>"#,
        t = esc(title)
    );
    if finite.is_empty() {
        let _ = write!(
            svg,
            r##"<text x="{L}" y="{}" font-size="12" fill="#666">no data</text></svg>"##,
            H / 2.0
        );
        return svg;
    }
    let (mut lo, mut hi) = finite
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &v| {
            (a.min(v), b.max(v))
        });
    if hi - lo < 1e-12 * hi.abs().max(1e-12) {
        let pad = if hi == 0.0 { 1.0 } else { hi.abs() * 0.1 };
        lo -= pad;
        hi += pad;
    }
    let x = |i: usize| {
        L + (W - L - R)
            * if n > 1 {
                i as f64 / (n - 1) as f64
            } else {
                0.5
            }
    };
    let y = |v: f64| T + (H - T - B) * (1.0 - (v - lo) / (hi - lo));
    // Axes and y ticks.
    let _ = write!(
        svg,
        r##"<line x1="{L}" y1="{T}" x2="{L}" y2="{yb}" stroke="#333"/><line x1="{L}" y1="{yb}" x2="{xr}" y2="{yb}" stroke="#333"/>"##,
        yb = H - B,
        xr = W - R
    );
    for k in 0..=4 {
        let v = lo + (hi - lo) * k as f64 / 4.0;
        let _ = write!(
            svg,
            r##"<line x1="{L}" y1="{py:.1}" x2="{xr}" y2="{py:.1}" stroke="#eee"/><text x="{tx}" y="{ty:.1}" font-size="10" text-anchor="end">{v}</text>"##,
            py = y(v),
            xr = W - R,
            tx = L - 4.0,
            ty = y(v) + 3.0,
            v = tick(v)
        );
    }
    // x ticks: at most 8 step labels.
    let every = n.div_ceil(8).max(1);
    for (i, s) in steps.iter().enumerate().filter(|(i, _)| i % every == 0) {
        let _ = write!(
            svg,
            r##"<text x="{px:.1}" y="{ty}" font-size="10" text-anchor="middle">{s}</text>"##,
            px = x(i),
            ty = H - B + 14.0
        );
    }
    let _ = write!(
        svg,
        r##"<text x="{cx}" y="{ty}" font-size="10" text-anchor="middle" fill="#555">step evaluated</text>"##,
        cx = (L + W - R) / 2.0,
        ty = H - B + 27.0
    );
    for m in marks {
        let _ = write!(
            svg,
            r##"<line x1="{px:.1}" y1="{T}" x2="{px:.1}" y2="{yb}" stroke="{c}" stroke-dasharray="4 3"/><text x="{tx:.1}" y="{ty}" font-size="9" fill="{c}">{l}</text>"##,
            px = x(m.at),
            yb = H - B,
            c = m.colour,
            tx = x(m.at) + 2.0,
            ty = T + 9.0,
            l = esc(&m.label)
        );
    }
    // Lines: a break at each missing value.
    for (k, s) in series.iter().enumerate() {
        let colour = COLOURS[k % COLOURS.len()];
        let mut runs: Vec<Vec<(f64, f64)>> = vec![Vec::new()];
        for (i, v) in s.values.iter().enumerate() {
            if v.is_finite() {
                runs.last_mut().expect("one run").push((x(i), y(*v)));
            } else if !runs.last().expect("one run").is_empty() {
                runs.push(Vec::new());
            }
        }
        for run in runs.iter().filter(|r| !r.is_empty()) {
            let points: Vec<String> = run.iter().map(|(a, b)| format!("{a:.1},{b:.1}")).collect();
            let _ = write!(
                svg,
                r#"<polyline fill="none" stroke="{colour}" stroke-width="1.8" points="{}"/>"#,
                points.join(" ")
            );
            if run.len() == 1 {
                let (a, b) = run[0];
                let _ = write!(
                    svg,
                    r#"<circle cx="{a:.1}" cy="{b:.1}" r="2.5" fill="{colour}"/>"#
                );
            }
        }
        let _ = write!(
            svg,
            r##"<rect x="{lx}" y="{ly}" width="10" height="3" fill="{colour}"/><text x="{tx}" y="{ty}" font-size="10">{name}</text>"##,
            lx = 8.0 + (k % 3) as f64 * 184.0,
            ly = H - B + 40.0 + (k / 3) as f64 * 11.0 - 4.0,
            tx = 8.0 + (k % 3) as f64 * 184.0 + 14.0,
            ty = H - B + 40.0 + (k / 3) as f64 * 11.0,
            name = esc(&s.name)
        );
    }
    svg.push_str("</svg>");
    svg
}

/// The evaluation index each event falls at: the first evaluation recorded at or after it
/// (timestamps are RFC 3339 UTC with milliseconds, so they sort as text).
fn marks(evals: &[EvalEntry], events: &[EventRecord]) -> Vec<Mark> {
    let at = |ts: &str| {
        evals
            .iter()
            .position(|e| e.ts.as_str() >= ts)
            .unwrap_or(evals.len().saturating_sub(1))
    };
    events
        .iter()
        .filter_map(|r| match &r.event {
            Event::Rollback { to, reason, .. } => Some(Mark {
                at: at(&r.ts),
                label: format!("rollback → {to} ({})", reason.label()),
                colour: "#D55E00",
            }),
            Event::PhaseChange { to, .. } => Some(Mark {
                at: at(&r.ts),
                label: format!("→ {to}"),
                colour: "#009E73",
            }),
            Event::LrRaised { .. } => Some(Mark {
                at: at(&r.ts),
                label: "lr ↑".into(),
                colour: "#0072B2",
            }),
            _ => None,
        })
        .collect()
}

/// The page (see the module docs). `title` names the run's source (the state directory).
pub fn render(
    title: &str,
    run: Option<&RunInfo>,
    evals: &[EvalEntry],
    generations: &[GenerationsEntry],
    events: &[EventRecord],
) -> String {
    let steps: Vec<u64> = evals.iter().map(|e| e.step).collect();
    let all_marks = marks(evals, events);
    let col = |f: &dyn Fn(&EvalEntry) -> f64| -> Vec<f64> { evals.iter().map(f).collect() };
    let line = |name: &str, values: Vec<f64>| Series {
        name: name.into(),
        values,
    };
    let gen = |f: &dyn Fn(&crate::eval::generations::GenerationMeasures) -> f64| -> Vec<f64> {
        evals
            .iter()
            .map(|e| e.generation.as_ref().map_or(f64::NAN, f))
            .collect()
    };
    let mut layers: Vec<usize> = evals
        .iter()
        .flat_map(|e| e.attention_per_layer.iter().map(|(l, _)| *l))
        .collect();
    layers.sort_unstable();
    layers.dedup();
    let mut attention = vec![line("mean", col(&|e| e.metrics.attention_on_direction))];
    for layer in layers.iter().take(7) {
        attention.push(line(
            &format!("layer {layer}"),
            col(&|e| {
                e.attention_per_layer
                    .iter()
                    .find(|(l, _)| l == layer)
                    .map_or(f64::NAN, |(_, r)| *r)
            }),
        ));
    }
    let charts = [
        chart(
            "Behaviour accuracy on held-out probes",
            &[
                line(
                    "clear direction (accept)",
                    col(&|e| e.metrics.clear_accuracy),
                ),
                line(
                    "flawed direction (push back)",
                    col(&|e| e.metrics.flawed_accuracy),
                ),
            ],
            &steps,
            &all_marks,
        ),
        chart(
            "Preference margin per token, nats (preferred − rejected)",
            &[
                line("clear direction", col(&|e| e.margin_per_token[0])),
                line("flawed direction", col(&|e| e.margin_per_token[1])),
            ],
            &steps,
            &all_marks,
        ),
        chart(
            "Attention on the direction span",
            &attention,
            &steps,
            &all_marks,
        ),
        chart(
            "Held-out perplexity",
            &[line("perplexity", col(&|e| e.metrics.perplexity))],
            &steps,
            &all_marks,
        ),
        chart(
            "General probes (multiple choice)",
            &[
                line("arithmetic", col(&|e| e.arithmetic[0])),
                line("code", col(&|e| e.code[0])),
            ],
            &steps,
            &all_marks,
        ),
        chart(
            "Learning rate (peak in force)",
            &[line("peak lr", col(&|e| e.peak_lr * e.lr_factor))],
            &steps,
            &all_marks,
        ),
        chart(
            "Replay, phase, duty cycle",
            &[
                line("replay ratio", col(&|e| e.replay_ratio)),
                line("arithmetic weight", col(&|e| e.replay_weights[0])),
                line("phase index", col(&|e| e.phase_index as f64)),
                line("duty cycle", col(&|e| e.duty_cycle)),
            ],
            &steps,
            &all_marks,
        ),
        chart(
            "What the model writes (generation probes)",
            &[
                line("push back, flawed", gen(&|g| g.push_back_flawed)),
                line("push back, clear", gen(&|g| g.push_back_clear)),
                line("hedging", gen(&|g| g.hedging)),
                line("distinct-2", gen(&|g| g.distinct_2)),
                line("arithmetic exact", gen(&|g| g.arithmetic_exact)),
                line("code pass", gen(&|g| g.code_pass)),
            ],
            &steps,
            &all_marks,
        ),
    ];
    let mut html = String::new();
    let _ = write!(
        html,
        r#"<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>dreamloop report: {t}</title><style>
body{{font-family:system-ui,sans-serif;margin:24px;color:#222;max-width:1200px}}
.grid{{display:grid;grid-template-columns:repeat(2,560px);gap:16px}}
table{{border-collapse:collapse;font-size:12px;width:100%}}td,th{{border:1px solid #ddd;padding:4px;vertical-align:top;text-align:left}}
pre{{white-space:pre-wrap;margin:0;font-size:11px}}.muted{{color:#666}}
</style></head><body><h1>dreamloop report</h1><p class="muted">{t}"#,
        t = esc(title)
    );
    if let Some(run) = run {
        let _ = write!(html, " · run <b>{}</b>", esc(&run.run_id));
    }
    if let (Some(first), Some(last)) = (evals.first(), evals.last()) {
        let _ = write!(
            html,
            " · {} evaluations, steps {}–{}, {} examples trained, {:.1} h of wall time · phase now {:?} (index {})",
            evals.len(),
            first.step,
            last.step,
            last.examples_trained,
            last.wall_seconds / 3600.0,
            last.phase,
            last.phase_index
        );
    }
    html.push_str("</p>");
    if evals.is_empty() {
        html.push_str("<p>No evaluations yet: evals.jsonl is empty or missing.</p>");
    }
    html.push_str(r#"<div class="grid">"#);
    for c in &charts {
        html.push_str(c);
    }
    html.push_str("</div>");
    let events_table: Vec<String> = events
        .iter()
        .filter(|r| {
            matches!(
                r.event,
                Event::Rollback { .. }
                    | Event::PhaseChange { .. }
                    | Event::LrRaised { .. }
                    | Event::ReplayWeight { .. }
                    | Event::PauseByPolicy { .. }
            )
        })
        .map(|r| {
            let json = serde_json::to_string(&r.event).unwrap_or_default();
            format!(
                "<tr><td>{}</td><td>{}</td><td><pre>{}</pre></td></tr>",
                esc(&r.ts),
                r.step,
                esc(&json)
            )
        })
        .collect();
    let _ = write!(
        html,
        "<h2>What the controller and the rollback policy did</h2><table><tr><th>when</th><th>step</th><th>event</th></tr>{}</table>",
        if events_table.is_empty() {
            "<tr><td colspan=3>nothing</td></tr>".to_string()
        } else {
            events_table.join("")
        }
    );
    html.push_str(&side_by_side(generations));
    html.push_str("</body></html>\n");
    html
}

/// The generations of the first and the latest evaluation, prompt by prompt.
fn side_by_side(generations: &[GenerationsEntry]) -> String {
    let (Some(first), Some(last)) = (generations.first(), generations.last()) else {
        return "<h2>Generations</h2><p>No generation probes recorded ([eval] generation_prompts = 0).</p>".into();
    };
    let mut html = format!(
        "<h2>Generations: step {} and step {}</h2><table><tr><th>probe</th><th>step {}</th><th>step {}</th></tr>",
        first.step, last.step, first.step, last.step
    );
    for g in &first.generations {
        let later = last
            .generations
            .iter()
            .find(|l| l.id == g.id && l.kind == g.kind);
        let cell = |x: Option<&crate::eval::generations::Generation>| match x {
            Some(x) => {
                let verdict = x.verdict();
                format!(
                    "<pre>{}</pre><span class=\"muted\">{}</span>",
                    esc(&x.reply),
                    esc(verdict)
                )
            }
            None => "—".into(),
        };
        let kind = match g.kind {
            GenKind::ClearDirection => "clear direction",
            GenKind::FlawedDirection => "flawed direction",
            GenKind::Arithmetic => "arithmetic",
            GenKind::Code => "code",
        };
        let _ = write!(
            html,
            "<tr><td>{kind}<br><span class=\"muted\">{}</span></td><td>{}</td><td>{}</td></tr>",
            esc(&g.id),
            cell(Some(g)),
            cell(later)
        );
    }
    html.push_str("</table>");
    html
}

#[cfg(test)]
mod tests;
