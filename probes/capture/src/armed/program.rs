//! The recorder's bpftrace program for one target binary.

use super::ARMED_BT;
use crate::preflight::{self, Refusal};
use std::path::Path;

/// `armed.bt` for the binary `exe`: refused without `stall_begin` (nothing would ever trigger a
/// capture); without `stall_end` (the watchdog's code path that fires it was not linked), that
/// probe's block is left out, since bpftrace refuses a program with a missing probe.
pub(super) fn for_binary(exe: &Path) -> Result<String, Refusal> {
    let probes = crate::stapsdt::probes_in(exe).map_err(|e| {
        Refusal::new(
            preflight::EXIT_NO_PROBE,
            format!("cannot read the probes of {}: {e}", exe.display()),
        )
    })?;
    let has = |name: &str| {
        probes
            .iter()
            .any(|(p, n)| p == probes::PROVIDER && n == name)
    };
    if !has("stall_begin") {
        return Err(Refusal::new(
            preflight::EXIT_NO_PROBE,
            format!("{} has no freezetrap:stall_begin probe: the armed recorder needs a service built with freezetrap that starts the watchdog (init_from_env with FREEZETRAP_STALL set)", exe.display()),
        ));
    }
    let mut program = ARMED_BT.to_string();
    if !has("stall_end") {
        if let Some(start) = program.find("usdt:$2:freezetrap:stall_end") {
            let end = program[start..]
                .find("\n}\n")
                .map_or(program.len(), |i| start + i + 3);
            program.replace_range(start..end, "");
        }
    }
    Ok(program)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_binary_without_stall_end_gets_a_program_without_it() {
        // This unit-test binary fires stall_begin (below, so the linker keeps the site) but
        // never stall_end.
        probes::stall_begin(0, 0, 0);
        let program = for_binary(&std::env::current_exe().unwrap()).unwrap();
        assert!(program.contains("usdt:$2:freezetrap:stall_begin"));
        assert!(!program.contains("freezetrap:stall_end"), "{program}");
        assert!(program.trim_end().ends_with('}'));
        let r = for_binary(Path::new("/bin/true")).unwrap_err();
        assert_eq!(r.code, preflight::EXIT_NO_PROBE);
        assert!(
            r.message.contains("has no freezetrap:stall_begin probe"),
            "{}",
            r.message
        );
    }
}
