// An unmodified-style Node.js server for `recluster --balance shared`: it serves the
// listening socket it inherits at fd 3 (systemd socket activation), answering each
// connection with one line and closing it. Used by tests/shared_mode.rs when `node`
// is on PATH:
//
//   recluster --balance shared --listen 127.0.0.1:8080 -- node examples/fd3.js
//
// On SIGTERM it stops accepting, lets open connections finish, and exits 0.
'use strict';

const net = require('net');

const server = net.createServer((socket) => {
  socket.on('error', () => {});
  socket.end(
    `id=${process.env.WORKER_ID} pid=${process.pid} gen=${process.env.RECLUSTER_GENERATION}\n`
  );
});

server.on('error', (err) => {
  console.error(`fd3.js[${process.pid}]: ${err.message}`);
  process.exit(1);
});

server.listen({ fd: 3 });

process.on('SIGTERM', () => {
  server.close(() => process.exit(0));
});
