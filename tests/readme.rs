//! The README's environment table is checked against the one place defaults live
//! (`alloc_guard::config::ENV_VARS`), and its first screen keeps exactly the two commands.

const README: &str = include_str!("../README.md");

#[test]
fn every_env_var_is_in_the_readme_table_with_its_default() {
    for v in freezetrap::alloc_guard::config::ENV_VARS
        .iter()
        .chain(freezetrap::watchdog::config::ENV_VARS)
    {
        let row = README
            .lines()
            .find(|l| l.starts_with(&format!("| `{}` |", v.name)))
            .unwrap_or_else(|| panic!("README has no table row for {}", v.name));
        let cells: Vec<&str> = row.split('|').map(str::trim).collect();
        assert_eq!(cells[3], v.default, "default of {} in README", v.name);
        assert_eq!(cells[4], v.effect, "effect of {} in README", v.name);
    }
}

#[test]
fn the_first_screen_gives_the_two_commands() {
    let section = README
        .split("## Two commands")
        .nth(1)
        .expect("a 'Two commands' section");
    let block = section
        .split("```sh")
        .nth(1)
        .unwrap()
        .split("```")
        .next()
        .unwrap();
    let cmds: Vec<&str> = block
        .lines()
        .map(|l| l.split('#').next().unwrap().trim())
        .filter(|l| !l.is_empty())
        .collect();
    assert_eq!(
        cmds,
        [
            "cargo run --release --example freeze_demo",
            "cargo test --release --workspace"
        ]
    );
    let ci = include_str!("../.ci/run");
    assert!(
        ci.lines().any(|l| l.trim() == cmds[1]),
        ".ci/run must run the README's test command"
    );
}
