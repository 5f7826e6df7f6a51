fn main() {
    std::process::exit(splitmirror::edge::cli::main());
}
