//! The attacks of issue #9 against the service side, each tried for real: a hostile or open
//! `FREEZETRAP_OUT`, a capture directory planted in advance (symlink to a victim, FIFO where a
//! program would be), a helper replaced after start, a helper that looks for the service's
//! secrets and descriptors, a pid that repeats across restarts (fresh pid namespaces), a
//! watchdog started from a short-lived thread, and a launcher killed mid-capture.
//!
//! The service is this test binary in a child role; its behaviour is set with `FT_*` variables
//! (the helper never sees them: it gets a fixed environment).

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

#[global_allocator]
static GLOBAL: freezetrap::GuardedAlloc<tikv_jemallocator::Jemalloc> =
    freezetrap::GuardedAlloc::new(tikv_jemallocator::Jemalloc);

fn env_ms(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// One heartbeat thread that stops beating for `FT_BLOCK_MS`.
fn one_stall() {
    std::thread::Builder::new()
        .name("worker".into())
        .spawn(|| {
            let hb = freezetrap::Heartbeat::new("worker");
            for _ in 0..20 {
                hb.beat();
                std::thread::sleep(Duration::from_millis(10));
            }
            std::thread::sleep(Duration::from_millis(env_ms("FT_BLOCK_MS", 400)));
            for _ in 0..20 {
                hb.beat();
                std::thread::sleep(Duration::from_millis(10));
            }
        })
        .unwrap()
        .join()
        .unwrap();
}

fn c_path(p: &Path) -> std::ffi::CString {
    use std::os::unix::ffi::OsStrExt;
    std::ffi::CString::new(p.as_os_str().as_bytes()).unwrap()
}

/// What an attacker who guessed the old directory name (`stall-<id>-<pid>`) plants: a
/// directory of their own with `helper.log` pointing at a victim and a FIFO at `capture.bt`.
fn plant(out: &Path, victim: &Path) -> PathBuf {
    let d = out.join(format!("stall-1-{}", std::process::id()));
    std::fs::create_dir(&d).unwrap();
    std::os::unix::fs::symlink(victim, d.join("helper.log")).unwrap();
    assert_eq!(
        unsafe { libc::mkfifo(c_path(&d.join("capture.bt")).as_ptr(), 0o644) },
        0
    );
    for p in [d.join("capture.bt"), d.clone()] {
        assert_eq!(unsafe { libc::chown(c_path(&p).as_ptr(), 65534, 65534) }, 0);
    }
    d
}

#[test]
fn child_service() {
    if common::role().as_deref() != Some("service") {
        return;
    }
    // A descriptor opened without close-on-exec before freezetrap starts: the helper must not
    // get it.
    let leaky = unsafe { libc::open(c"/etc/hostname".as_ptr(), libc::O_RDONLY) };
    assert!(leaky >= 0);
    if let (Ok(out), Ok(victim)) = (std::env::var("FT_PLANT_IN"), std::env::var("FT_VICTIM")) {
        let d = plant(Path::new(&out), Path::new(&victim));
        println!("PLANTED {}", d.display());
    }
    let ft = if std::env::var_os("FT_INIT_ON_THREAD").is_some() {
        // PR_SET_PDEATHSIG is per thread: a launcher tied to this thread would die with it.
        std::thread::spawn(freezetrap::init_from_env)
            .join()
            .unwrap()
    } else {
        freezetrap::init_from_env()
    };
    if let (Ok(sub), Ok(helper)) = (
        std::env::var("FT_SWAP_FROM"),
        std::env::var("FREEZETRAP_CAPTURE"),
    ) {
        std::fs::rename(sub, helper).unwrap();
        println!("SWAPPED");
    }
    one_stall();
    if std::env::var_os("FT_KILL_LAUNCHER").is_some() {
        // The first capture is running (its helper sleeps): kill the launcher under it.
        std::thread::sleep(Duration::from_millis(200));
        let pid = ft
            .watchdog()
            .and_then(|w| w.capture_launcher_pid())
            .expect("a launcher");
        unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
        println!("KILLED_LAUNCHER {pid}");
        // The watchdog notices and starts a new launcher once no stall is open.
        let until = std::time::Instant::now() + Duration::from_secs(10);
        while ft
            .watchdog()
            .and_then(|w| w.capture_launcher_pid())
            .is_none_or(|p| p == pid)
        {
            assert!(std::time::Instant::now() < until, "no new launcher");
            std::thread::sleep(Duration::from_millis(20));
        }
        one_stall();
    }
    std::thread::sleep(Duration::from_millis(env_ms("FT_LINGER_MS", 300)));
    drop(ft);
    unsafe { libc::close(leaky) };
    println!("SERVICE_OK");
}

struct Run {
    stderr: String,
    stdout: String,
    out: PathBuf,
}

fn run_service(out: &Path, env: &[(&str, &str)]) -> Run {
    let mut cmd = common::child("child_service", "service");
    cmd.env("FREEZETRAP_STALL", "150ms")
        .env("FREEZETRAP_OUT", out)
        .env("FREEZETRAP_REPORT", "report.jsonl");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let o = common::run_with_timeout(&mut cmd, Duration::from_secs(60));
    let run = Run {
        stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
        out: out.to_path_buf(),
    };
    assert!(
        o.status.success() && run.stdout.contains("SERVICE_OK"),
        "the service must run on:\n{}\n{}",
        run.stdout,
        run.stderr
    );
    run
}

impl Run {
    fn capture_dirs(&self) -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = std::fs::read_dir(&self.out)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.is_dir())
            .collect();
        v.sort();
        v
    }

    fn stalls(&self) -> Vec<serde_json::Value> {
        common::stalls(&self.out.join("report.jsonl"))
    }
}

fn root_or_skip(test: &str) -> bool {
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    if std::env::var("FREEZETRAP_REQUIRE_EBPF").as_deref() == Ok("1") {
        panic!(
            "{test} needs root (it changes owners), and FREEZETRAP_REQUIRE_EBPF=1 forbids skipping"
        );
    }
    eprintln!("SKIPPED {test}: needs root to create files owned by another user");
    false
}

/// A helper script (0700, ours) that records that it ran and with what arguments.
fn marker_helper(dir: &Path, name: &str, word: &str) -> PathBuf {
    common::write_helper(dir, name, &format!("echo {word} > \"$8/who\""))
}

#[test]
fn an_out_directory_owned_by_another_user_or_open_to_all_is_refused() {
    if common::role().is_some() {
        return;
    }
    let dir = common::TempDir::new("sec-open-out");
    let open = dir.path().join("open");
    std::fs::create_dir(&open).unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
    let mut cases = vec![(open, "is writable by group or others (mode 777)")];
    if root_or_skip("an_out_directory_owned_by_another_user") {
        let theirs = dir.path().join("theirs");
        std::fs::create_dir(&theirs).unwrap();
        assert_eq!(
            unsafe { libc::chown(c_path(&theirs).as_ptr(), 65534, 65534) },
            0
        );
        cases.push((theirs, "is owned by uid 65534"));
    }
    let helper = marker_helper(dir.path(), "h.sh", "ran");
    for (out, why) in cases {
        let r = run_service(&out, &[("FREEZETRAP_CAPTURE", helper.to_str().unwrap())]);
        let lines: Vec<&str> = r
            .stderr
            .lines()
            .filter(|l| l.starts_with("freezetrap: FREEZETRAP_OUT="))
            .collect();
        assert_eq!(lines.len(), 1, "{}", r.stderr);
        assert!(
            lines[0].starts_with(&format!(
                "freezetrap: FREEZETRAP_OUT={} is refused: ",
                out.display()
            )) && lines[0].contains(why),
            "{}",
            lines[0]
        );
        assert_eq!(
            std::fs::read_dir(&out).unwrap().count(),
            0,
            "nothing is written inside {}",
            out.display()
        );
        assert!(
            r.stderr.contains("stalled"),
            "the stall is still reported:\n{}",
            r.stderr
        );
        assert!(
            r.stderr.contains("captures stay off"),
            "and says captures are off:\n{}",
            r.stderr
        );
        // The relative FREEZETRAP_REPORT meant "under FREEZETRAP_OUT": not the working directory.
        assert!(
            r.stderr.contains(
                "FREEZETRAP_REPORT=report.jsonl is relative to FREEZETRAP_OUT, which was refused: the JSON report is off"
            ),
            "{}",
            r.stderr
        );
    }
}

#[test]
fn a_planted_capture_directory_is_never_written_through() {
    if common::role().is_some()
        || !root_or_skip("a_planted_capture_directory_is_never_written_through")
    {
        return;
    }
    let dir = common::TempDir::new("sec-plant");
    let out = dir.path().join("out");
    std::fs::create_dir(&out).unwrap();
    let victim = dir.path().join("victim");
    std::fs::write(&victim, "precious").unwrap();
    let helper = marker_helper(dir.path(), "h.sh", "ran");
    let r = run_service(
        &out,
        &[
            ("FREEZETRAP_CAPTURE", helper.to_str().unwrap()),
            ("FT_PLANT_IN", out.to_str().unwrap()),
            ("FT_VICTIM", victim.to_str().unwrap()),
        ],
    );
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
    let planted = PathBuf::from(
        r.stdout
            .lines()
            .find_map(|l| l.strip_prefix("PLANTED "))
            .unwrap(),
    );
    let planted_entries: Vec<_> = std::fs::read_dir(&planted)
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(
        planted_entries.len(),
        2,
        "the planted directory is untouched: {planted_entries:?}"
    );
    // The capture went to a fresh directory of our own, next to it.
    let stall = &r.stalls()[0];
    let cap = PathBuf::from(stall["capture"]["dir"].as_str().expect("a capture dir"));
    assert_ne!(cap, planted);
    let name = cap.file_name().unwrap().to_str().unwrap().to_string();
    assert!(
        name.starts_with(&format!(
            "{}-",
            planted.file_name().unwrap().to_str().unwrap()
        )) && name.len() == planted.file_name().unwrap().len() + 17,
        "stall-<id>-<pid>-<16 hex digits>: {name}"
    );
    assert_eq!(
        std::fs::read_to_string(cap.join("who")).unwrap().trim(),
        "ran"
    );
    let meta = std::fs::symlink_metadata(cap.join("helper.log")).unwrap();
    assert!(meta.is_file() && meta.permissions().mode() & 0o777 == 0o600);
}

#[test]
fn a_helper_replaced_after_start_never_runs_the_substitute() {
    if common::role().is_some() {
        return;
    }
    let dir = common::TempDir::new("sec-swap");
    let out = dir.path().join("out");
    let helper = marker_helper(dir.path(), "h.sh", "original");
    let substitute = marker_helper(dir.path(), "sub.sh", "substitute");
    let r = run_service(
        &out,
        &[
            ("FREEZETRAP_CAPTURE", helper.to_str().unwrap()),
            ("FT_SWAP_FROM", substitute.to_str().unwrap()),
        ],
    );
    assert!(r.stdout.contains("SWAPPED"));
    assert!(
        std::fs::read_to_string(&helper)
            .unwrap()
            .contains("substitute"),
        "the path was swapped"
    );
    let caps = r.capture_dirs();
    assert_eq!(caps.len(), 1, "{caps:?}\n{}", r.stderr);
    assert_eq!(
        std::fs::read_to_string(caps[0].join("who")).unwrap().trim(),
        "original",
        "the helper checked at start ran, from its open file"
    );
}

/// A helper in C (an ELF, as the shipped helper is) that writes its environment and its open
/// descriptors into the capture directory.
fn dump_helper(dir: &Path) -> PathBuf {
    let src = dir.join("dump.c");
    std::fs::write(
        &src,
        r#"
#include <dirent.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
extern char **environ;
int main(int argc, char **argv) {
    const char *out = 0;
    for (int i = 1; i + 1 < argc; i++) if (!strcmp(argv[i], "--out")) out = argv[i + 1];
    if (!out) return 2;
    char fds[4096] = "";
    DIR *d = opendir("/proc/self/fd");
    if (!d) return 3;
    struct dirent *e;
    while ((e = readdir(d))) {
        if (e->d_name[0] == '.' || atoi(e->d_name) == dirfd(d)) continue;
        strcat(fds, e->d_name);
        strcat(fds, "\n");
    }
    closedir(d);
    char path[4096];
    snprintf(path, sizeof path, "%s/fds", out);
    FILE *f = fopen(path, "w");
    if (!f) return 4;
    fputs(fds, f);
    fclose(f);
    snprintf(path, sizeof path, "%s/env", out);
    f = fopen(path, "w");
    if (!f) return 5;
    for (char **v = environ; *v; v++) fprintf(f, "%s\n", *v);
    fclose(f);
    return 0;
}
"#,
    )
    .unwrap();
    let exe = dir.join("dump");
    let st = std::process::Command::new("cc")
        .arg("-O1")
        .arg("-o")
        .arg(&exe)
        .arg(&src)
        .status()
        .expect("a C compiler (cc), which building jemalloc needed too");
    assert!(st.success());
    exe
}

#[test]
fn the_helper_gets_no_environment_and_no_descriptor_of_the_service() {
    if common::role().is_some() {
        return;
    }
    let dir = common::TempDir::new("sec-env");
    let out = dir.path().join("out");
    let helper = dump_helper(dir.path());
    let r = run_service(
        &out,
        &[
            ("FREEZETRAP_CAPTURE", helper.to_str().unwrap()),
            ("SECRET_TOKEN", "hunter2"),
            ("LD_PRELOAD", "libm.so.6"),
        ],
    );
    let caps = r.capture_dirs();
    assert_eq!(caps.len(), 1, "{}", r.stderr);
    let env = std::fs::read_to_string(caps[0].join("env")).unwrap();
    assert_eq!(
        env.trim(),
        "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "nothing inherited (no SECRET_TOKEN, no LD_PRELOAD, no FREEZETRAP_*)"
    );
    let fds = std::fs::read_to_string(caps[0].join("fds")).unwrap();
    let mut fds: Vec<u32> = fds.lines().map(|l| l.parse().unwrap()).collect();
    fds.sort();
    assert_eq!(fds, [0, 1, 2], "descriptors 0-2 only");
}

#[test]
fn a_watchdog_started_on_a_thread_that_exits_still_captures() {
    if common::role().is_some() {
        return;
    }
    let dir = common::TempDir::new("sec-thread");
    let out = dir.path().join("out");
    let helper = marker_helper(dir.path(), "h.sh", "ran");
    let r = run_service(
        &out,
        &[
            ("FREEZETRAP_CAPTURE", helper.to_str().unwrap()),
            ("FT_INIT_ON_THREAD", "1"),
        ],
    );
    let caps = r.capture_dirs();
    assert_eq!(caps.len(), 1, "{}", r.stderr);
    assert_eq!(
        std::fs::read_to_string(caps[0].join("who")).unwrap().trim(),
        "ran"
    );
}

#[test]
fn a_launcher_killed_mid_capture_is_noticed_and_replaced() {
    if common::role().is_some() {
        return;
    }
    let dir = common::TempDir::new("sec-kill");
    let out = dir.path().join("out");
    let helper = common::write_helper(dir.path(), "slow.sh", "echo ran > \"$8/who\"\nsleep 3");
    let r = run_service(
        &out,
        &[
            ("FREEZETRAP_CAPTURE", helper.to_str().unwrap()),
            ("FREEZETRAP_CAPTURE_COOLDOWN", "1ms"),
            ("FT_KILL_LAUNCHER", "1"),
            ("FT_LINGER_MS", "500"),
        ],
    );
    assert!(r.stdout.contains("KILLED_LAUNCHER"), "{}", r.stdout);
    assert!(
        r.stderr
            .contains("freezetrap: the capture launcher process had died: started a new one"),
        "{}",
        r.stderr
    );
    let lines = common::report_lines(&out.join("report.jsonl"));
    let first = lines
        .iter()
        .find(|l| l["event"] == "capture" && l["stall_id"] == 1)
        .unwrap_or_else(|| panic!("no capture line for stall 1: {lines:#?}"));
    assert!(
        first["status"]
            .as_str()
            .unwrap()
            .contains("launcher process had died"),
        "{first}"
    );
    let second = &r.stalls()[1];
    let st = second["capture"]["status"].as_str().unwrap();
    assert!(
        st == "running" || st == "exited 0",
        "not busy forever: {st}"
    );
}

#[test]
fn two_runs_with_the_same_pid_keep_both_captures() {
    if common::role().is_some() || !root_or_skip("two_runs_with_the_same_pid_keep_both_captures") {
        return;
    }
    let dir = common::TempDir::new("sec-pidns");
    let out = dir.path().join("out");
    let helper = marker_helper(dir.path(), "h.sh", "ran");
    for run in 0..2 {
        // A fresh pid namespace: the service is pid 1 both times, and its stall ids restart.
        let template = common::child("child_service", "service");
        let mut cmd = std::process::Command::new("unshare");
        cmd.args(["--pid", "--fork", "--mount-proc"])
            .arg(std::env::current_exe().unwrap())
            .args(template.get_args())
            .envs(template.get_envs().filter_map(|(k, v)| Some((k, v?))))
            .env("FREEZETRAP_STALL", "150ms")
            .env("FREEZETRAP_OUT", &out)
            .env("FREEZETRAP_REPORT", "report.jsonl")
            .env("FREEZETRAP_CAPTURE", &helper)
            .env("FT_LINGER_MS", "1000");
        let o = common::run_with_timeout(&mut cmd, Duration::from_secs(60));
        assert!(
            o.status.success(),
            "run {run}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
    let mut caps: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .flatten()
        .filter(|e| e.path().is_dir())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    caps.sort();
    assert_eq!(caps.len(), 2, "{caps:?}");
    for c in &caps {
        assert!(c.starts_with("stall-1-1-"), "{c}");
        assert_eq!(
            std::fs::read_to_string(out.join(c).join("who"))
                .unwrap()
                .trim(),
            "ran"
        );
    }
}
