//! An axum app served by a recluster worker, unchanged but for where its listener
//! comes from and how it drains (feature `axum`).
//!
//! ```text
//! cargo build --release --features axum --bin recluster --example axum
//! target/release/recluster --listen 127.0.0.1:8080 -- target/release/examples/axum
//! curl http://127.0.0.1:8080/      # -> hello from worker 1 gen=1
//! ```
//!
//! On stop it drains as `docs/PROTOCOL.md` ("Draining on stop") says: every response
//! from then on says `Connection: close` (hyper closes the connection after it), and
//! axum's graceful shutdown starts [`IDLE_GRACE`] later. It starts late on purpose:
//! it closes the connections that are idle at that moment, and at the moment of stop
//! that would cut the requests keep-alive clients are sending.

use std::time::Duration;

use axum::http::{header, HeaderValue};
use axum::middleware::map_response;
use axum::response::Response;
use axum::{routing::get, Router};

/// After stop, how long a connection with no request in progress may still begin one
/// (answered with `Connection: close`) before axum's graceful shutdown closes it; the
/// same as `examples/http.rs`, which says why 1 s.
const IDLE_GRACE: Duration = Duration::from_secs(1);

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::io::Result<()> {
    let listener = recluster::worker::Listener::from_env()?;
    let stopping = listener.stopping();
    let app = Router::new()
        .route(
            "/",
            get(|| async {
                use recluster::worker::{generation, id};
                format!("hello from worker {} gen={}\n", id(), generation())
            }),
        )
        // After stop, answer and close: the client reconnects, to a new worker.
        .layer(map_response({
            let stopping = stopping.clone();
            move |mut response: Response| {
                if stopping.is_stopping() {
                    response
                        .headers_mut()
                        .insert(header::CONNECTION, HeaderValue::from_static("close"));
                }
                std::future::ready(response)
            }
        }));
    // Graceful shutdown: no new connections (there are none after stop anyway), the
    // requests in progress finish, idle connections are closed, then serve returns.
    let shutdown = async move {
        stopping.stopped().await;
        tokio::time::sleep(IDLE_GRACE).await;
    };
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}
