//! `refinery::embed_migrations!` reads `migrations/` while compiling, which cargo cannot see:
//! without this line a new or edited migration would not rebuild the crate, and the binary
//! would silently run the old set.
fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
