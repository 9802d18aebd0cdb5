// Node's own cluster module as the primary, for comparison and for checking the test
// apps without recluster: forks WORKERS copies of SCRIPT (default http_server.js),
// each with WORKER_ID and RECLUSTER_GENERATION=1 like recluster's, round robin
// (SCHED_RR, the Linux default). Prints `cluster ready workers=N` on stderr.
//
//   PORT=8080 WORKERS=4 node tests/node/cluster_primary.js tests/node/sio_server.js
'use strict';
const cluster = require('cluster');
const path = require('path');

cluster.schedulingPolicy = cluster.SCHED_RR;
const workers = Number(process.env.WORKERS || 2);
const script = path.resolve(process.argv[2] || path.join(__dirname, 'http_server.js'));
cluster.setupPrimary({ exec: script, args: process.argv.slice(3) });
let listening = 0;
for (let id = 0; id < workers; id++) {
  const w = cluster.fork({ WORKER_ID: String(id), RECLUSTER_GENERATION: '1' });
  w.once('listening', () => {
    listening += 1;
    if (listening === workers) console.error(`cluster ready workers=${workers}`);
  });
}
process.on('SIGTERM', () => {
  cluster.disconnect(() => process.exit(0));
  setTimeout(() => process.exit(0), 2000);
});
