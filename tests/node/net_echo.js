// A plain `net` server for tests/proxy_protocol.rs: greets each client with its
// WORKER_ID and the socket's remoteAddress, then echoes.
const net = require('net');
const gen = process.env.RECLUSTER_GENERATION;
net.createServer((s) => {
  s.write(`id=${process.env.WORKER_ID} pid=${process.pid} gen=${gen} remote=${s.remoteAddress}\n`);
  s.pipe(s);
}).listen(Number(process.env.PORT));
