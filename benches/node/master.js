// npm recluster in front of N copies of worker.js: Node's cluster module, whose
// primary accepts every connection and hands it to a worker round robin
// (SCHED_RR, the default on Linux). Run by `cargo bench --bench compare`.
//
//   PORT=8080 WORKERS=2 node master.js     # prints "cluster ready" on stderr
'use strict';
const path = require('path');
const cluster = require('cluster');
const recluster = require('recluster');

cluster.schedulingPolicy = cluster.SCHED_RR; // the Linux default, made explicit
const workers = Number(process.env.WORKERS) || 2;
const c = recluster(path.join(__dirname, 'worker.js'), {
  workers,
  timeout: 1,
  readyWhen: 'listening',
  log: { respawns: false },
});
let ready = 0;
c.on('ready', () => {
  ready += 1;
  if (ready === workers) console.error('cluster ready workers=' + workers);
});
c.run();
process.on('SIGTERM', () => {
  c.terminate(() => process.exit(0));
  setTimeout(() => process.exit(0), 2000).unref();
});
