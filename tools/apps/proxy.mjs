// A logging reverse proxy between an app and `cfg-textgen serve`: every request is forwarded
// unchanged (streams pass through as they arrive) and one JSON line per request is appended to the
// log, so a run shows exactly what the app sent and what the server answered.
//
// usage: node proxy.mjs --listen 5152 --target http://127.0.0.1:5151 --log /work/apps/shots/traffic.jsonl
import http from 'node:http';
import fs from 'node:fs';
import { parseArgs } from 'node:util';

const { values: args } = parseArgs({
    options: {
        listen: { type: 'string', default: '5152' },
        target: { type: 'string', default: 'http://127.0.0.1:5151' },
        log: { type: 'string', default: 'traffic.jsonl' },
        // how much of each answer is kept in the log (a stream's first events are what matter)
        keep: { type: 'string', default: '6000' },
    },
});
const target = new URL(args.target);
const keep = Number(args.keep);

function parsedOrText(buffer) {
    const text = buffer.toString('utf8');
    if (!text) return null;
    try { return JSON.parse(text); } catch { return text.slice(0, keep); }
}

/** The answer's `x-...` headers, as `{headers: {...}}`, or nothing when there are none. */
function xHeaders(headers) {
    const own = Object.fromEntries(Object.entries(headers).filter(([k]) => k.startsWith('x-')));
    return Object.keys(own).length ? { headers: own } : {};
}

http.createServer((req, res) => {
    const started = Date.now();
    const chunks = [];
    req.on('data', (c) => chunks.push(c));
    req.on('end', () => {
        const body = Buffer.concat(chunks);
        const headers = { ...req.headers, host: target.host };
        const upstream = http.request({
            host: target.hostname, port: target.port, path: req.url, method: req.method, headers,
        }, (answer) => {
            res.writeHead(answer.statusCode, answer.headers);
            const kept = [];
            let keptBytes = 0;
            answer.on('data', (c) => {
                res.write(c);
                if (keptBytes < keep) { kept.push(c); keptBytes += c.length; }
            });
            answer.on('end', () => {
                res.end();
                const record = {
                    time: new Date(started).toISOString(), ms: Date.now() - started,
                    method: req.method, path: req.url, origin: req.headers.origin ?? null,
                    body: parsedOrText(body), status: answer.statusCode,
                    content_type: answer.headers['content-type'] ?? null,
                    // the server's own headers (X-Skipped-Samplers, ...): what it says it did not use
                    ...xHeaders(answer.headers),
                    answer: parsedOrText(Buffer.concat(kept).subarray(0, keep)),
                };
                fs.appendFileSync(args.log, JSON.stringify(record) + '\n');
                console.log(`${record.status} ${req.method} ${req.url} ${record.ms}ms`);
            });
        });
        upstream.on('error', (err) => {
            if (res.destroyed) return; // the app went away first: logged on close
            fs.appendFileSync(args.log, JSON.stringify({
                time: new Date(started).toISOString(), method: req.method, path: req.url,
                body: parsedOrText(body), status: null, error: String(err),
            }) + '\n');
            if (res.headersSent) { res.end(); return; }
            res.writeHead(502, { 'content-type': 'text/plain' });
            res.end(`proxy: ${err}`);
        });
        // the app closing its side (an abort) closes ours, as it would reach the server directly;
        // the log says so, with the body the app had sent
        res.on('close', () => {
            if (res.writableFinished) return;
            upstream.destroy();
            fs.appendFileSync(args.log, JSON.stringify({
                time: new Date(started).toISOString(), ms: Date.now() - started, method: req.method,
                path: req.url, origin: req.headers.origin ?? null, body: parsedOrText(body), status: null,
                error: 'the app closed the connection before the answer ended',
            }) + '\n');
        });
        upstream.end(body);
    });
}).listen(Number(args.listen), '127.0.0.1', () => {
    console.log(`proxy 127.0.0.1:${args.listen} -> ${args.target}, log ${args.log}`);
});
