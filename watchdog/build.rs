//! `cfg(ft_linux)`: the Linux code paths. Off on other systems, and also on Linux when the build
//! sets `--cfg freezetrap_portable`, so CI can compile the portable paths on this machine.
fn main() {
    println!("cargo::rustc-check-cfg=cfg(ft_linux)");
    println!("cargo::rustc-check-cfg=cfg(freezetrap_portable)");
    println!("cargo::rerun-if-env-changed=CARGO_CFG_FREEZETRAP_PORTABLE");
    let linux = std::env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("linux");
    if linux && std::env::var_os("CARGO_CFG_FREEZETRAP_PORTABLE").is_none() {
        println!("cargo::rustc-cfg=ft_linux");
    }
}
