// The `--ready-when ready` variant of http_server.js: the same server, which tells
// its master it is ready with `process.send({cmd: 'ready'})` (recluster's and npm
// recluster's explicit readiness) SEND_READY_AFTER_MS ms after it listens (default
// 0). Before that it is listening but not ready: it must receive no connection.
'use strict';
if (process.env.SEND_READY_AFTER_MS === undefined) process.env.SEND_READY_AFTER_MS = '0';
require('./http_server.js');
