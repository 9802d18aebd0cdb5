// An unmodified Node.js HTTP server, as people write them: it knows nothing of
// recluster and calls `listen(PORT)` itself. Under `recluster --via node` it runs as
// a Node cluster worker (the master answers its `queryServer` and feeds it
// connections). Used by tests/node.rs and benches/node_compare.rs.
//
//   PORT=8080 node http_server.js        (or: node http_server.js 8080)
//
// Routes:
//   /               200 "worker=<WORKER_ID> pid=<pid> gen=<RECLUSTER_GENERATION>\n"
//   /slow?ms=N      the same after N ms (logs `node_app slow_start` when it starts)
//
// Environment read by the tests only (none of it is needed to run under recluster):
//   SEND_READY_AFTER_MS=N   call process.send({cmd: 'ready'}) N ms after listening,
//                           logging `node_app ready_sent pid=<pid> at_ms=<epoch ms>`
//                           first (for `--ready-when ready`)
//   LOG_CONNECTIONS=1       log `node_app conn_open pid=<pid>` / `conn_close` for
//                           every connection (stderr is synchronous on a pipe, so a
//                           killed worker has logged every connection it accepted)
'use strict';
const http = require('http');

const port = Number(process.env.PORT || process.argv[2]);
if (!Number.isInteger(port) || port <= 0) {
  console.error('http_server.js: set PORT or pass the port as the first argument');
  process.exit(2);
}
const log = (what) => process.stderr.write(`node_app ${what} pid=${process.pid}\n`);
const body = () =>
  `worker=${process.env.WORKER_ID} pid=${process.pid} gen=${process.env.RECLUSTER_GENERATION}\n`;
const answer = (res) => {
  const b = body();
  res.writeHead(200, { 'Content-Type': 'text/plain', 'Content-Length': Buffer.byteLength(b) });
  res.end(b);
};

const server = http.createServer((req, res) => {
  const url = new URL(req.url, 'http://localhost');
  if (url.pathname === '/slow') {
    const ms = Number(url.searchParams.get('ms')) || 1000;
    log(`slow_start ms=${ms}`);
    setTimeout(() => answer(res), ms);
    return;
  }
  answer(res);
});

if (process.env.LOG_CONNECTIONS === '1') {
  server.on('connection', (socket) => {
    log('conn_open');
    socket.on('close', () => log('conn_close'));
  });
}

server.listen(port, () => {
  const after = process.env.SEND_READY_AFTER_MS;
  if (after !== undefined && process.send) {
    setTimeout(() => {
      process.stderr.write(`node_app ready_sent pid=${process.pid} at_ms=${Date.now()}\n`);
      process.send({ cmd: 'ready' });
    }, Number(after));
  }
});
