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
    // such option). CHASSIS_SYMBOL_ORDER names another list; empty, none.
    let arch = std::env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_default();
    let manifest = std::env::var("CARGO_MANIFEST_DIR").unwrap_or_default();
    let default = format!("{manifest}/symbol-order.txt");
    let order = std::env::var("CHASSIS_SYMBOL_ORDER").unwrap_or(default);
    if os == "linux" && env == "gnu" && arch == "x86_64" && std::path::Path::new(&order).is_file() {
        println!("cargo:rustc-link-arg-bins=-Wl,--symbol-ordering-file={order}");
        // Names of functions that are gone (inlined, renamed) are skipped quietly.
        println!("cargo:rustc-link-arg-bins=-Wl,--no-warn-symbol-ordering");
    }
    if !order.is_empty() {
        println!("cargo:rerun-if-changed={order}");
    }
    println!("cargo:rerun-if-env-changed=CHASSIS_SYMBOL_ORDER");
    println!("cargo:rerun-if-changed=build.rs");
}
