//! Link flags for the `chassis-oauth-proxy` binary.

fn main() {
    let os = std::env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    let env = std::env::var("CARGO_CFG_TARGET_ENV").unwrap_or_default();
    // Packed relative relocations (DT_RELR, glibc 2.36 and binutils 2.38 or newer; the
    // image's Debian 12 has both). The loader reads the whole relocation table at
    // start-up, so it stayed resident: packing shrinks it from ~420 KB to a few KB.
    // The binary is still position-independent (ASLR unchanged); an older glibc
    // refuses to load it with a clear "GLIBC_ABI_DT_RELR not found".
    if os == "linux" && env == "gnu" {
        println!("cargo:rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");
    }
    // The functions that serve requests first and together (symbol-order.txt, made by
    // `make proxy-symbol-order`): the kernel maps code in 64 KB blocks around each page
    // that runs, so scattered hot functions kept most of the code resident. Only with
    // LLD, the default linker of x86_64-unknown-linux-gnu since Rust 1.90 (GNU ld has no
    // such option). CHASSIS_SYMBOL_ORDER names another list (relative to this crate);
    // empty, none.
    let target = std::env::var("TARGET").unwrap_or_default();
    let manifest = std::path::PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap_or_default());
    let named = std::env::var("CHASSIS_SYMBOL_ORDER").ok();
    let order = manifest.join(named.as_deref().unwrap_or("symbol-order.txt"));
    if named.as_deref() != Some("") {
        println!("cargo:rerun-if-changed={}", order.display());
        if target == "x86_64-unknown-linux-gnu" && links_with_lld() {
            if order.is_file() {
                // Two arguments rather than `-Wl,`, which would split a path at its commas.
                println!("cargo:rustc-link-arg-bins=-Xlinker");
                println!(
                    "cargo:rustc-link-arg-bins=--symbol-ordering-file={}",
                    order.display()
                );
                // Names of functions that are gone (inlined, renamed) are skipped quietly.
                println!("cargo:rustc-link-arg-bins=-Wl,--no-warn-symbol-ordering");
            } else if named.is_some() {
                println!("cargo:warning=CHASSIS_SYMBOL_ORDER: no file {}", order.display());
            }
        }
    }
    println!("cargo:rerun-if-env-changed=CHASSIS_SYMBOL_ORDER");
    println!("cargo:rerun-if-changed=build.rs");
}

/// Whether the binary is linked by Rust's own LLD: rustc 1.90 or newer (its default
/// for this target), shipped with its `gcc-ld/ld.lld` (a distribution's rustc may
/// leave it out), and no linker or linker flags of the user's.
fn links_with_lld() -> bool {
    if std::env::var_os("RUSTC_LINKER").is_some() {
        return false;
    }
    let flags = std::env::var("CARGO_ENCODED_RUSTFLAGS").unwrap_or_default();
    if flags.split('\x1f').any(|f| {
        f.starts_with("linker")
            || f.starts_with("-Clinker")
            || f.contains("fuse-ld")
            || f.contains("link-self-contained")
    }) {
        return false;
    }
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let run = |arg: &str| {
        std::process::Command::new(&rustc)
            .args(arg.split(' '))
            .output()
            .ok()
            .map(|out| String::from_utf8_lossy(&out.stdout).trim().to_string())
            .unwrap_or_default()
    };
    // "rustc 1.95.0 (59807616e 2026-04-14)"
    let version = run("--version");
    let mut numbers = version
        .split_whitespace()
        .nth(1)
        .unwrap_or_default()
        .split('.')
        .map(|n| n.parse::<u32>().unwrap_or(0));
    let (major, minor) = (numbers.next().unwrap_or(0), numbers.next().unwrap_or(0));
    let sysroot = run("--print sysroot");
    (major, minor) >= (1, 90)
        && std::path::Path::new(&sysroot)
            .join("lib/rustlib/x86_64-unknown-linux-gnu/bin/gcc-ld/ld.lld")
            .is_file()
}
