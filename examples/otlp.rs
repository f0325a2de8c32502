//! Stalls in an OpenTelemetry pipeline: a service whose `tracing` subscriber exports spans over
//! OTLP/HTTP (protobuf) with `tracing-opentelemetry`, as many services already do. With the
//! `tracing` feature, freezetrap emits each stall as a WARN event (target `freezetrap::stall`,
//! the report's fields as fields) inside a span named `freezetrap.stall`, so the collector
//! receives a span per stall with the event on it; large allocations likewise
//! (`freezetrap.large_alloc`, INFO).
//!
//! ```text
//! # any OTLP/HTTP receiver: an OpenTelemetry Collector, Jaeger, Tempo, ... on port 4318
//! OTEL_EXPORTER_OTLP_TRACES_ENDPOINT=http://127.0.0.1:4318/v1/traces \
//!   FREEZETRAP_STALL=200ms cargo run --release --example otlp
//! ```
//!
//! The worker below stops beating for 600 ms; freezetrap reports the stall from its report
//! thread, and the span is exported from there (a simple exporter sends each span as it ends;
//! a batch exporter works the same way). `tests/otlp.rs` runs this against a receiver on
//! loopback and finds the stall in what arrives.

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::{Protocol, SpanExporter, WithExportConfig};
use opentelemetry_sdk::trace::SdkTracerProvider;
use std::time::Duration;
use tracing_subscriber::layer::SubscriberExt;

#[global_allocator]
static GLOBAL: freezetrap::GuardedAlloc<tikv_jemallocator::Jemalloc> =
    freezetrap::GuardedAlloc::new(tikv_jemallocator::Jemalloc);

fn main() {
    let endpoint = std::env::var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        .unwrap_or_else(|_| "http://127.0.0.1:4318/v1/traces".into());
    let exporter = SpanExporter::builder()
        .with_http()
        .with_protocol(Protocol::HttpBinary)
        .with_endpoint(endpoint)
        .build()
        .expect("an OTLP/HTTP span exporter");
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(exporter)
        .build();
    let subscriber = tracing_subscriber::registry()
        .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("otlp-example")));
    tracing::subscriber::set_global_default(subscriber).expect("the only global subscriber");

    let ft = freezetrap::init_from_env();
    if ft.watchdog().is_none() {
        eprintln!("otlp example: set FREEZETRAP_STALL (for example 200ms) to start the watchdog");
    }
    std::thread::Builder::new()
        .name("worker".into())
        .spawn(|| {
            let hb = freezetrap::Heartbeat::new("worker");
            hb.beat();
            std::thread::sleep(Duration::from_millis(600)); // the freeze
            hb.beat();
        })
        .unwrap()
        .join()
        .unwrap();
    // Let the report thread report the stall (and export its span) before shutting down.
    std::thread::sleep(Duration::from_millis(500));
    drop(ft);
    if let Err(e) = provider.shutdown() {
        eprintln!("otlp example: exporter shutdown: {e}");
    }
}
