//! The typed events reach the stack a service already runs: `on_stall` / `on_large_alloc`
//! callbacks (one of them panicking), a `tracing` subscriber, and the `metrics` facade served by
//! `metrics-exporter-prometheus` and scraped over loopback — all from one real stall (a
//! heartbeat thread spinning 400 ms after two 96 MiB allocations).
//!
//! The service runs as a child process so its stderr (the panic line, said once) can be read.

mod common;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[global_allocator]
static GLOBAL: freezetrap::GuardedAlloc<tikv_jemallocator::Jemalloc> =
    freezetrap::GuardedAlloc::new(tikv_jemallocator::Jemalloc);

/// One `tracing` event as a subscriber saw it.
#[derive(Debug, Clone)]
struct Seen {
    target: String,
    level: tracing::Level,
    fields: BTreeMap<String, String>,
}

/// A `tracing` layer that keeps every event with its fields as text.
struct Recorder(Arc<Mutex<Vec<Seen>>>);

struct Fields<'a>(&'a mut BTreeMap<String, String>);

impl tracing::field::Visit for Fields<'_> {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        self.0.insert(
            field.name().to_string(),
            format!("{value:?}").trim_matches('"').to_string(),
        );
    }
    fn record_u64(&mut self, field: &tracing::field::Field, value: u64) {
        self.0.insert(field.name().to_string(), value.to_string());
    }
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        self.0.insert(field.name().to_string(), value.to_string());
    }
}

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Recorder {
    fn on_event(
        &self,
        event: &tracing::Event<'_>,
        _ctx: tracing_subscriber::layer::Context<'_, S>,
    ) {
        let mut fields = BTreeMap::new();
        event.record(&mut Fields(&mut fields));
        self.0.lock().unwrap().push(Seen {
            target: event.metadata().target().to_string(),
            level: *event.metadata().level(),
            fields,
        });
    }
}

#[inline(never)]
fn spin(ms: u64) -> u64 {
    let until = Instant::now() + Duration::from_millis(ms);
    let mut x = 0u64;
    while Instant::now() < until {
        x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
    }
    x
}

/// `GET /metrics` over loopback, the way Prometheus scrapes.
fn scrape(port: u16) -> String {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect to the exporter");
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

#[test]
fn child_service() {
    if common::role().as_deref() != Some("service") {
        return;
    }
    use tracing_subscriber::layer::SubscriberExt;
    let seen = Arc::new(Mutex::new(Vec::new()));
    tracing::subscriber::set_global_default(
        tracing_subscriber::registry().with(Recorder(seen.clone())),
    )
    .unwrap();
    // A free loopback port for the exporter.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    metrics_exporter_prometheus::PrometheusBuilder::new()
        .with_http_listener(([127, 0, 0, 1], port))
        .install()
        .expect("the Prometheus exporter starts");

    let allocs = Arc::new(Mutex::new(Vec::new()));
    let stalls = Arc::new(Mutex::new(Vec::new()));
    freezetrap::on_large_alloc(|_| panic!("a callback with a bug"));
    {
        let allocs = allocs.clone();
        freezetrap::on_large_alloc(move |a| {
            allocs.lock().unwrap().push((a.size, a.thread_name.clone()))
        });
    }
    {
        let stalls = stalls.clone();
        freezetrap::on_stall(move |r| {
            stalls.lock().unwrap().push((
                r.thread_name.clone(),
                r.verdict.cause.as_str().to_string(),
                r.duration_ns,
            ))
        });
    }
    let ft = freezetrap::init_from_env();
    std::thread::Builder::new()
        .name("blocker".into())
        .spawn(|| {
            let hb = freezetrap::Heartbeat::new("blocker");
            for _ in 0..2 {
                let v = vec![1u8; 96 << 20];
                std::hint::black_box(&v);
            }
            hb.beat();
            spin(400); // the stall
            hb.beat();
            std::thread::sleep(Duration::from_millis(300)); // the watchdog sees the end
        })
        .unwrap()
        .join()
        .unwrap();
    ft.reporter().unwrap().flush(Duration::from_secs(5));
    let until = Instant::now() + Duration::from_secs(10);
    while !stalls.lock().unwrap().iter().any(|s| s.1 == "on_cpu") && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(20));
    }

    // The callbacks: typed values, and the one after the panicking one still called.
    let allocs = allocs.lock().unwrap().clone();
    assert_eq!(
        allocs,
        vec![(96 << 20, "blocker".to_string()); 2],
        "on_large_alloc"
    );
    let stalls = stalls.lock().unwrap().clone();
    assert!(
        stalls
            .iter()
            .any(|(name, cause, d)| name == "blocker" && cause == "on_cpu" && *d >= 300_000_000),
        "on_stall: {stalls:?}"
    );

    // tracing: one WARN per stall, one INFO per large allocation, fields as fields.
    let seen = seen.lock().unwrap().clone();
    // (Filling the allocations is a first_touch stall of its own; the spin is on_cpu.)
    let stall = seen
        .iter()
        .find(|e| {
            e.target == "freezetrap::stall"
                && e.fields.get("cause").map(String::as_str) == Some("on_cpu")
        })
        .unwrap_or_else(|| panic!("no on_cpu freezetrap::stall event: {seen:#?}"));
    assert_eq!(stall.level, tracing::Level::WARN);
    assert_eq!(stall.fields["thread_name"], "blocker", "{stall:?}");
    assert_eq!(stall.fields["scope"], "thread", "{stall:?}");
    assert!(stall.fields["message"].contains("stalled"), "{stall:?}");
    let large: Vec<&Seen> = seen
        .iter()
        .filter(|e| e.target == "freezetrap::large_alloc")
        .collect();
    assert_eq!(large.len(), 2, "{seen:#?}");
    assert_eq!(large[0].level, tracing::Level::INFO);
    assert_eq!(large[0].fields["size"], (96u64 << 20).to_string());
    assert!(
        large[0].fields["site"].contains("ecosystem"),
        "{:?}",
        large[0]
    );

    // metrics, as a Prometheus server would read them.
    let text = scrape(port);
    println!("{text}");
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(
        text.lines()
            .any(|l| l.starts_with("freezetrap_stalls_total{cause=\"on_cpu\"} ")),
        "{text}"
    );
    assert!(
        text.lines().any(|l| l == "freezetrap_large_allocs_total 2"),
        "{text}"
    );
    assert!(
        text.lines()
            .any(|l| l.starts_with("freezetrap_stall_duration_seconds_count ")),
        "{text}"
    );
    println!("SERVICE OK");
}

#[test]
fn typed_events_reach_callbacks_tracing_and_a_prometheus_scrape() {
    if common::role().is_some() {
        return;
    }
    let mut cmd = common::child("child_service", "service");
    cmd.env("FREEZETRAP_ALLOC_THRESHOLD", "64MiB")
        .env("FREEZETRAP_STALL", "100ms")
        .env("FREEZETRAP_QUIET", "1");
    let out = common::run_with_timeout(&mut cmd, Duration::from_secs(60));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stdout.contains("SERVICE OK"),
        "stdout:\n{stdout}\nstderr:\n{stderr}"
    );
    assert_eq!(
        stderr
            .matches("freezetrap: an on_large_alloc callback panicked (a callback with a bug)")
            .count(),
        1,
        "the panicking callback is said once: {stderr}"
    );
}
