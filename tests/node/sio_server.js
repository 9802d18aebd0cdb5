// A plain socket.io server: polling first, then the upgrade to websocket (socket.io's
// default). Each connected client may emit `ping` with an ack; the ack carries the
// WORKER_ID that served it. A polling session lives in one worker's memory, so every
// request of a session must reach that worker: under Node's cluster (round robin)
// most sessions break; under `recluster --balance sticky --via node` none do.
//
//   NODE_PATH=target/node-deps/node_modules PORT=8080 node tests/node/sio_server.js
'use strict';
const http = require('http');
const { Server } = require('socket.io');

const port = Number(process.env.PORT || process.argv[2]);
const server = http.createServer();
const io = new Server(server, { transports: ['polling', 'websocket'] });
io.on('connection', (socket) => {
  socket.on('ping', (cb) => {
    if (typeof cb === 'function') cb(process.env.WORKER_ID);
  });
});
server.listen(port);
