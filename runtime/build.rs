//! Records where libtorch is in the runtime's binaries (an rpath), so that a built
//! `infergate-runtime` starts from a plain shell, without torch's `lib/` on `LD_LIBRARY_PATH`.
//! torch-sys reports the directory it linked against to its direct dependents.

fn main() {
    println!("cargo::rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    if let Ok(dir) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        // RUNPATH (the linker's default): LD_LIBRARY_PATH, as set in images, still comes first.
        println!("cargo::rustc-link-arg=-Wl,-rpath,{dir}");
    }
}
