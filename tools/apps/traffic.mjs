// Prints proxy.mjs's log as one line per request: time, status, method, path, the generate fields
// that matter for CFG and the known gaps, and the start of the answer.
// usage: node traffic.mjs /work/apps/shots/traffic.jsonl [--since 10:30:00] [--full]
import fs from 'node:fs';
import { parseArgs } from 'node:util';

const { values: args, positionals } = parseArgs({
    allowPositionals: true,
    options: { since: { type: 'string', default: '' }, full: { type: 'boolean', default: false } },
});
const interesting = ['guidance_scale', 'negative_prompt', 'memory', 'use_default_badwordsids', 'logprobs',
    'n_probs', 'stream', 'genkey', 'sampler_priority', 'sampler_order', 'adaptive_target', 'max_length',
    'max_tokens', 'n_predict', 'cache_prompt'];
const short = (v) => {
    const text = typeof v === 'string' ? v : JSON.stringify(v);
    return text.length > 80 ? `${text.slice(0, 60)}...(${text.length} chars)` : text;
};
for (const line of fs.readFileSync(positionals[0] ?? 'traffic.jsonl', 'utf8').split('\n')) {
    if (!line.trim()) continue;
    const r = JSON.parse(line);
    if (r.time.slice(11, 19) < args.since) continue;
    let out = `${r.time.slice(11, 19)} ${r.status ?? 'ERR'} ${r.method} ${r.path} ${r.ms ?? ''}ms`;
    if (r.body && typeof r.body === 'object') {
        const keys = interesting.filter((k) => k in r.body).map((k) => `${k}=${short(r.body[k])}`);
        if (keys.length) out += `\n    sent: ${keys.join(' ')}`;
        if (args.full) out += `\n    body: ${JSON.stringify(r.body)}`;
    }
    if (r.error) out += `\n    proxy: ${r.error}`;
    else out += `\n    got: ${short(r.answer).slice(0, args.full ? 100000 : 300)}`;
    console.log(out);
}
