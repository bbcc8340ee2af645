//! `GET /` on the device's public port: a small status page, rendered on the device with no
//! script — the models and their versions, traffic policies, requests and failures, drift and
//! quality per version, and the last things the device decided by itself (canary verdicts).
//! Everything on it is also in `/metrics` and the admin API.

use std::fmt::Write;

use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};

use crate::api::Ctx;

fn esc(v: &str) -> String {
    v.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// The page.
pub(crate) async fn page(State(ctx): State<Ctx>) -> Response {
    let device = &ctx.device;
    let mut html = String::from(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>Outpost device</title>\
         <meta http-equiv=\"refresh\" content=\"10\"><style>body{font:14px/1.4 system-ui,sans-serif;margin:1rem 1.5rem}\
         table{border-collapse:collapse}th,td{text-align:left;padding:.2rem .6rem;border-bottom:1px solid #ddd}\
         th{background:#f0f2f5}.bad{color:#b00020;font-weight:600}.warn{color:#a15c00}.ok{color:#1b7f3b}</style></head><body>",
    );
    let _ = write!(
        html,
        "<h1>Outpost device</h1><p>runtime {} · fleet link: {}</p>",
        env!("CARGO_PKG_VERSION"),
        match device.metrics.link().map(|l| l.status()) {
            Some(s) if s.connected => format!("connected, {} record(s) waiting", s.outbox_records),
            Some(s) => format!("disconnected, {} record(s) waiting", s.outbox_records),
            None => "none".into(),
        }
    );
    html.push_str("<h2>Models</h2><table><tr><th>model</th><th>active</th><th>loaded</th><th>policy</th></tr>");
    match device.status() {
        Ok(models) => {
            for m in models {
                let policy = match (&m.policy, m.policy.id()) {
                    (_, None) => "primary".to_owned(),
                    (p, Some(id)) => {
                        let versions: Vec<&str> = p.versions().collect();
                        format!("{} → {}", id, versions.join(", "))
                    }
                };
                let _ = write!(
                    html,
                    "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                    esc(&m.name),
                    esc(m.active.as_deref().unwrap_or("none")),
                    esc(&m.resident.join(", ")),
                    esc(&policy)
                );
            }
        }
        Err(e) => {
            let _ = write!(
                html,
                "<tr><td colspan=\"4\" class=\"bad\">{}</td></tr>",
                esc(&e.to_string())
            );
        }
    }
    html.push_str("</table><h2>Requests</h2><table><tr><th>model</th><th>version</th><th>requests</th><th>failed</th><th>last</th></tr>");
    for s in device.metrics.stats() {
        let _ = write!(
            html,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td class=\"{}\">{}</td><td>{}</td></tr>",
            esc(&s.model),
            esc(&s.version),
            s.requests,
            if s.failures > 0 { "bad" } else { "ok" },
            s.failures,
            s.last_ms / 1000
        );
    }
    html.push_str("</table><h2>Drift against the training baseline</h2><table><tr><th>model</th><th>version</th><th>feature</th><th>PSI</th><th>level</th><th>observations</th></tr>");
    for v in device.metrics.drift.report() {
        for f in &v.features {
            let level = f.level.unwrap_or("-");
            let class = match level {
                "significant" => "bad",
                "moderate" => "warn",
                _ => "ok",
            };
            let _ = write!(
                html,
                "<tr><td>{}</td><td>{}</td><td>{}{}</td><td>{}</td><td class=\"{class}\">{level}</td><td>{}</td></tr>",
                esc(&v.model),
                esc(&v.version),
                esc(&f.feature),
                if f.output { " (output)" } else { "" },
                f.psi.map_or("-".to_owned(), |p| format!("{p:.4}")),
                f.window_n
            );
        }
    }
    html.push_str("</table><h2>Quality from feedback</h2><table><tr><th>model</th><th>version</th><th>labels</th><th>accuracy</th><th>MAE</th></tr>");
    for q in device.metrics.feedback.report() {
        let _ = write!(
            html,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            esc(&q.model),
            esc(&q.version),
            q.window_labels,
            q.window_accuracy
                .map_or("-".to_owned(), |a| format!("{a:.4}")),
            q.window_mae.map_or("-".to_owned(), |m| format!("{m:.4}"))
        );
    }
    html.push_str("</table><h2>Recent decisions</h2><table><tr><th>time</th><th>event</th></tr>");
    for e in device.events(10).unwrap_or_default().iter().rev() {
        let text = serde_json::to_string(&e.event).unwrap_or_default();
        let _ = write!(html, "<tr><td>{}</td><td>{}</td></tr>", e.time, esc(&text));
    }
    html.push_str("</table></body></html>");
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'none'; style-src 'unsafe-inline'",
            ),
        ],
        html,
    )
        .into_response()
}
