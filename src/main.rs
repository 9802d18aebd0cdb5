//! The `recluster` command: a thin layer over the library's [`recluster::cli`].

fn main() {
    std::process::exit(recluster::cli::main());
}
