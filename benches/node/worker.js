// The Node equivalent of examples/http.rs: 200 OK with a short body naming the
// worker, HTTP/1.1 keep-alive, `Connection: close` honoured.
'use strict';
const http = require('http');

const body = Buffer.from('worker=' + (process.env.WORKER_ID || '0') + '\n');
const server = http.createServer((req, res) => {
  res.writeHead(200, { 'Content-Type': 'text/plain', 'Content-Length': body.length });
  res.end(body);
});
server.keepAliveTimeout = 60000;
server.listen(Number(process.env.PORT) || 8080, process.env.HOST || '127.0.0.1');
