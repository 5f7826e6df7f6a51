fn main() {
    std::process::exit(splitmirror::cli::main());
}
