//! A real OpenTelemetry pipeline receives the stall: `examples/otlp.rs` exports spans with
//! `tracing-opentelemetry` and `opentelemetry-otlp` (OTLP/HTTP, protobuf) to a receiver on
//! loopback, here a plain HTTP listener that keeps each request. The stall must arrive as a
//! `freezetrap.stall` span carrying the report's fields.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::time::Duration;

fn example() -> std::path::PathBuf {
    // tests live in target/<profile>/deps; examples in target/<profile>/examples.
    let exe = std::env::current_exe().unwrap();
    let bin = exe
        .parent()
        .and_then(|d| d.parent())
        .unwrap()
        .join("examples")
        .join("otlp");
    assert!(
        bin.is_file(),
        "{} not built (cargo test builds examples)",
        bin.display()
    );
    bin
}

/// Serves OTLP/HTTP requests until the channel's receiver is gone: (path, body) of each.
fn receiver() -> (u16, std::sync::mpsc::Receiver<(String, Vec<u8>)>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let mut reader = BufReader::new(conn.try_clone().unwrap());
            let mut request_line = String::new();
            if reader.read_line(&mut request_line).is_err() {
                continue;
            }
            let path = request_line.split(' ').nth(1).unwrap_or("").to_string();
            let mut length = 0usize;
            loop {
                let mut header = String::new();
                if reader.read_line(&mut header).unwrap_or(0) == 0 || header == "\r\n" {
                    break;
                }
                if let Some((k, v)) = header.split_once(':') {
                    if k.eq_ignore_ascii_case("content-length") {
                        length = v.trim().parse().unwrap_or(0);
                    }
                }
            }
            let mut body = vec![0u8; length];
            let _ = reader.read_exact(&mut body);
            let _ = conn.write_all(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/x-protobuf\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            );
            if tx.send((path, body)).is_err() {
                return;
            }
        }
    });
    (port, rx)
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn a_stall_reaches_an_otlp_receiver_as_a_span_with_its_fields() {
    let (port, rx) = receiver();
    let out = std::process::Command::new(example())
        .env(
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
            format!("http://127.0.0.1:{port}/v1/traces"),
        )
        .env("FREEZETRAP_STALL", "200ms")
        .env_remove("FREEZETRAP_OUT")
        .env_remove("FREEZETRAP_CAPTURE")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let mut requests = Vec::new();
    while let Ok(r) = rx.recv_timeout(Duration::from_secs(2)) {
        requests.push(r);
    }
    let stall = requests
        .iter()
        .find(|(_, body)| contains(body, b"freezetrap.stall"))
        .unwrap_or_else(|| {
            panic!(
                "no freezetrap.stall span among {} request(s) to the receiver; the service said:\n{stderr}",
                requests.len()
            )
        });
    assert_eq!(stall.0, "/v1/traces");
    for field in [
        &b"cause"[..],
        b"confidence",
        b"duration_ns",
        b"thread_name",
        b"worker",
        b"stalled",
    ] {
        assert!(
            contains(&stall.1, field),
            "the span lacks {:?}",
            String::from_utf8_lossy(field)
        );
    }
}
