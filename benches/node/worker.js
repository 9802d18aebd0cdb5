// The Node equivalent of examples/http.rs: 200 OK with a short body naming the
// worker, HTTP/1.1 keep-alive, `Connection: close` honoured. One unmodified server
// for every Node contender of `cargo bench --bench compare`: under npm recluster,
// under `recluster --via node` (rr, sticky), under `recluster --balance shared`
// (fd 3) and as standalone SO_REUSEPORT copies where Node supports it.
'use strict';
const http = require('http');

const body = Buffer.from('worker=' + (process.env.WORKER_ID || '0') + '\n');
const server = http.createServer((req, res) => {
  res.writeHead(200, { 'Content-Type': 'text/plain', 'Content-Length': body.length });
  res.end(body);
});
server.keepAliveTimeout = 60000;
const port = Number(process.env.PORT) || 8080;
const host = process.env.HOST || '127.0.0.1';
if (process.env.LISTEN_FDS) {
  // `recluster --balance shared`: the listening socket inherited at fd 3.
  server.listen({ fd: 3 });
} else if (process.env.REUSEPORT === '1') {
  // One of N standalone copies on SO_REUSEPORT (Node >= 22.12 / 23.1; older Node
  // ignores the option and the second copy fails with EADDRINUSE).
  server.listen({ port, host, reusePort: true });
} else {
  // Under npm recluster (Node's cluster) or `recluster --via node`: the primary /
  // master answers this listen.
  server.listen(port, host);
}
