// Opens COUNT socket.io clients against URL, client i from source address
// 127.0.0.(FIRST_SOURCE + i), each with transports ['polling', 'websocket'] (polling
// first, then the upgrade). Each client connects, emits `ping` with an ack (the
// WORKER_ID that answered) and waits for the upgrade to websocket. No reconnection:
// a broken session is an error. Prints one JSON line of results, then the same
// figures as one `sio_results key=value …` line, and exits 0.
//
//   NODE_PATH=target/node-deps/node_modules \
//     URL=http://127.0.0.1:8080 COUNT=100 node tests/node/sio_clients.js
//
// The source address goes through an http.Agent({localAddress}) passed as the
// client's `agent` option: engine.io-client hands it to its polling requests
// (xmlhttprequest-ssl → http.request) and to `ws` for the websocket (verified: the
// server sees every request of a session, polling and websocket, from that address).
'use strict';
const http = require('http');
const { io } = require('socket.io-client');

const url = process.env.URL || process.argv[2];
const count = Number(process.env.COUNT || 100);
const first = Number(process.env.FIRST_SOURCE || 2);
const timeoutMs = Number(process.env.TIMEOUT_MS || 10000);
const upgradeWaitMs = Number(process.env.UPGRADE_WAIT_MS || 3000);

const results = [];
let finished = 0;

function finish(r) {
  results.push(r);
  finished += 1;
  if (finished === count) report();
}

function report() {
  const out = { clients: count, connected: 0, acked: 0, upgraded: 0, errors: {}, workers: {}, sources: 0 };
  const sources = new Set();
  for (const r of results) {
    if (r.connected) out.connected += 1;
    if (r.acked) {
      out.acked += 1;
      out.workers[r.worker] = (out.workers[r.worker] || 0) + 1;
      sources.add(r.source);
    }
    if (r.upgraded) out.upgraded += 1;
    if (r.error) out.errors[r.error] = (out.errors[r.error] || 0) + 1;
  }
  out.sources = sources.size;
  const failed = count - results.filter((r) => r.acked && r.upgraded).length;
  process.stdout.write(JSON.stringify(out) + '\n');
  // The same figures as key=value, for tests/node.rs (no JSON parser there).
  process.stdout.write(
    `sio_results clients=${count} connected=${out.connected} acked=${out.acked} ` +
      `upgraded=${out.upgraded} failed=${failed} sources=${out.sources} ` +
      `workers=${Object.keys(out.workers).length}\n`
  );
  process.exit(0);
}

for (let i = 0; i < count; i++) {
  const n = first + i;
  const source = `127.0.${Math.floor(n / 256)}.${n % 256}`;
  const agent = new http.Agent({ localAddress: source });
  const socket = io(url, {
    transports: ['polling', 'websocket'],
    agent,
    forceNew: true,
    reconnection: false,
    timeout: timeoutMs,
  });
  const r = { source, connected: false, acked: false, upgraded: false, worker: null, error: null };
  let done = false;
  const end = (error) => {
    if (done) return;
    done = true;
    if (error && !r.error) r.error = error;
    clearTimeout(timer);
    socket.close();
    finish(r);
  };
  const timer = setTimeout(() => end('timeout'), timeoutMs + upgradeWaitMs);
  const maybeEnd = () => {
    if (r.acked && r.upgraded) end(null);
  };
  socket.on('connect', () => {
    r.connected = true;
    const engine = socket.io.engine;
    if (engine.transport && engine.transport.name === 'websocket') r.upgraded = true;
    engine.once('upgrade', () => {
      r.upgraded = true;
      maybeEnd();
    });
    setTimeout(() => {
      if (!r.upgraded) end('no upgrade');
    }, upgradeWaitMs);
    socket.timeout(timeoutMs).emit('ping', (err, worker) => {
      if (err) return end('ack timeout');
      r.acked = true;
      r.worker = worker;
      maybeEnd();
    });
  });
  socket.on('connect_error', (err) => end(`connect_error: ${err.message}`));
  socket.on('disconnect', (reason) => {
    if (!(r.acked && r.upgraded)) end(`disconnect: ${reason}`);
  });
}
setTimeout(() => {
  // Bounded whatever happens: report what finished.
  for (let k = finished; k < count; k++) results.push({ error: 'unfinished' });
  finished = count;
  report();
}, timeoutMs + upgradeWaitMs + 5000).unref();
