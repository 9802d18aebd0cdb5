//! The quick-start worker: greets each client with its WORKER_ID and the client's IP,
//! then echoes what the client sends.
//!
//! ```text
//! cargo build --release --bin recluster --example echo
//! target/release/recluster --listen 127.0.0.1:8080 -- target/release/examples/echo
//! nc 127.0.0.1 8080     # -> id=1 pid=4242 gen=1 peer=127.0.0.1
//! ```
//!
//! It works unchanged in every balance mode (`rr`, `sticky`, `shared`): that is what
//! [`recluster::worker::Listener`] is for. On stop it accepts no more, lets the open
//! connections finish, and exits.

use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::io::Result<()> {
    let mut listener = recluster::worker::Listener::from_env()?;
    recluster::worker::ready()?;
    let (id, generation, pid) = (
        recluster::worker::id(),
        recluster::worker::generation(),
        std::process::id(),
    );
    let mut tasks = tokio::task::JoinSet::new();
    while let Some((mut stream, peer)) = listener.accept().await? {
        tasks.spawn(async move {
            let greeting = format!("id={id} pid={pid} gen={generation} peer={}\n", peer.ip());
            if stream.write_all(greeting.as_bytes()).await.is_err() {
                return;
            }
            let mut buf = [0u8; 4096];
            while let Ok(n) = stream.read(&mut buf).await {
                if n == 0 || stream.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
        });
        // Reap finished connections as we go so the set stays small.
        while tasks.try_join_next().is_some() {}
    }
    // Stop: drain the connections in flight, then exit.
    while tasks.join_next().await.is_some() {}
    Ok(())
}
