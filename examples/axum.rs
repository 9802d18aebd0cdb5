//! An axum app served by a recluster worker, unchanged but for where its listener
//! comes from (feature `axum`).
//!
//! ```text
//! cargo build --release --features axum --bin recluster --example axum
//! target/release/recluster --listen 127.0.0.1:8080 -- target/release/examples/axum
//! curl http://127.0.0.1:8080/      # -> hello from worker 1 gen=1
//! ```

use axum::{routing::get, Router};

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::io::Result<()> {
    let listener = recluster::worker::Listener::from_env()?;
    let stop = listener.shutdown();
    let app = Router::new().route(
        "/",
        get(|| async {
            use recluster::worker::{generation, id};
            format!("hello from worker {} gen={}\n", id(), generation())
        }),
    );
    // On stop: no new connections, in-flight requests finish, then serve returns.
    axum::serve(listener, app)
        .with_graceful_shutdown(stop)
        .await
}
