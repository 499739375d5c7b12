// Drives Kobold Lite (klite.embd served as a static page) the way a user does: AI -> "KoboldAI
// Remote API" with our server's URL, Settings (mode, token streaming, output length), Context ->
// Memory, type a story, Submit, wait, screenshot; optionally abort mid-generation. What the page
// saw and the story text go to <shots>/<name>.json; run proxy.mjs in front of the server to see
// the wire. The server must allow the page's origin: `cfg-textgen serve --cors-origin <lite origin>`.
//
// usage: node kobold-lite.mjs --lite http://127.0.0.1:8124/klite.html --server http://127.0.0.1:5152 \
//          --mode story|instruct --stream off|poll|sse [--abort] [--tokens 60] [--shots DIR] [--name N] \
//          [--generations 2] [--banned "phrase||$||other"]
// --generations N: after the first (maybe aborted) generation, Submit N-1 more times with an empty
// input box (Lite continues the story; each prompt starts with the previous one);
// --banned: Context -> Tokens -> "Phrase / Word Ban (Anti-Slop)", phrases separated by ||$||.
import { parseArgs } from 'node:util';
import { openBrowser, watchPage, shoot, endRun, sleep, commonOptions } from './browser.mjs';

const { values: args } = parseArgs({
    options: {
        ...commonOptions,
        lite: { type: 'string', default: 'http://127.0.0.1:8124/klite.html' },
        mode: { type: 'string', default: 'story' },
        stream: { type: 'string', default: 'sse' },
        abort: { type: 'boolean', default: false },
        // with --abort: how long to let it write first, and the output length (long enough to abort)
        'abort-after': { type: 'string', default: '3' },
        'abort-tokens': { type: 'string', default: '400' },
        memory: { type: 'string', default: '[Genre: gothic horror. The narrator is Mara, a lighthouse keeper on a cold northern island.]' },
        story: { type: 'string', default: 'The lighthouse keeper had not seen a ship in eleven years. Then, one foggy night,' },
        instruction: { type: 'string', default: 'Write a short poem about a lighthouse in winter.' },
        generations: { type: 'string', default: '1' },
        banned: { type: 'string', default: '' },
    },
});
const opmode = { story: '1', instruct: '4' }[args.mode];
const streamMode = { off: '0', poll: '1', sse: '2' }[args.stream];
if (!opmode) throw new Error(`--mode: story or instruct (got ${args.mode})`);
if (!streamMode) throw new Error(`--stream: off, poll or sse (got ${args.stream})`);
const name = args.name ?? `lite-${args.mode}-${args.stream}${args.abort ? '-abort' : ''}`;

const result = { name, mode: args.mode, stream: args.stream, abort: args.abort, server: args.server, steps: [] };
const step = (what, detail = '') => { result.steps.push(`${what}${detail ? ': ' + detail : ''}`); console.log(what, detail); };
const storyText = () => page.locator('#gametext').innerText();
const generating = () => page.evaluate(() => pending_response_id !== '' || synchro_pending_stream !== '');

async function dismissMessageBox(when) {
    const box = page.locator('#msgboxcontainer:not(.hidden)');
    if (await box.count()) {
        const text = (await box.locator('#msgboxtxt').innerText()).trim().replace(/\s+/g, ' ');
        step(`message box ${when}`, text.slice(0, 300));
        await box.locator('button').first().click();
        await sleep(300);
        return text;
    }
    return null;
}

const { browser, context } = await openBrowser();
const page = await context.newPage();
const seen = watchPage(page, name);
try {
    await page.goto(args.lite, { waitUntil: 'load' });
    await page.waitForSelector('#gametext');
    await sleep(1000);
    step('Kobold Lite loaded', await page.evaluate(() => `LITEVER ${LITEVER}`));
    // served from anywhere but lite.koboldai.net, Lite first tries its own origin as a KoboldCpp
    // and says it failed: a user clicks that message away
    await dismissMessageBox('at load');

    // AI -> KoboldAI Remote API -> URL -> Ok
    await page.evaluate(() => display_endpoint_container());
    await page.selectOption('#customapidropdown', '1');
    await page.fill('#customkoboldendpoint', args.server);
    await shoot(page, args.shots, `${name}-0-connect-dialog`);
    await page.locator('button[onclick="connect_custom_endpoint()"]').click();
    await page.waitForFunction(() => /KoboldCpp|KoboldAI Endpoint/.test(document.getElementById('connectstatus').textContent),
        null, { timeout: 30000 }).catch(() => {});
    await sleep(1500); // the version, context and preload calls follow the model call
    result.connect_status = (await page.locator('#connectstatus').innerText()).trim();
    step('connect', result.connect_status);
    await shoot(page, args.shots, `${name}-1-connected`);
    result.connect_message = await dismissMessageBox('after connect');
    if (!/KoboldCpp|KoboldAI Endpoint/.test(result.connect_status)) throw new Error(`not connected: ${result.connect_status}`);
    // first connection: "Welcome To KoboldAI Lite, pick a UI style" -> Classic UI, Set UI
    const setUi = page.locator('button:visible', { hasText: 'Set UI' });
    if (await setUi.count()) { await setUi.first().click(); step('welcome: Classic UI set'); await sleep(500); }

    // Settings: mode, token streaming, max output
    await page.locator('#btn_settings').click();
    await page.waitForSelector('#settingscontainer:not(.hidden)');
    await page.selectOption('#opmode', opmode);
    await page.locator('#settingsmenusamplers_tab a').click();
    await page.fill('#max_length', args.abort ? args['abort-tokens'] : args.tokens);
    await page.locator('#max_length').dispatchEvent('input');
    await shoot(page, args.shots, `${name}-2-settings-samplers`);
    await page.locator('#settingsmenuadvanced_tab a').click();
    await page.selectOption('#tokenstreammode', streamMode);
    await shoot(page, args.shots, `${name}-2-settings-advanced`);
    await page.locator('#settingscontainer #btn_settingsaccept').click();
    step('settings', `opmode ${opmode}, tokenstreammode ${streamMode}`);

    // Context -> Memory
    if (args.mode === 'story') {
        await page.locator('#btn_actmem').click();
        await page.waitForSelector('#memorycontainer:not(.hidden)');
        await page.fill('#memorytext', args.memory);
        if (args.banned) {
            await page.locator('#token_tab a').click();
            await page.locator('button[onclick="expand_tokens_section(\'expandtokenbans\')"]').click();
            await page.fill('#tokenbans', args.banned);
            await shoot(page, args.shots, `${name}-2-token-bans`);
            step('banned phrases', args.banned);
        }
        await page.locator('#memorycontainer button[onclick^="confirm_memory()"]').click();
        step('memory set', args.memory);
    }

    result.stories = [];
    for (let gen = 1; gen <= Number(args.generations); gen++) {
        // type (the first time) and submit
        await page.fill('#input_text', gen > 1 ? '' : args.mode === 'story' ? args.story : args.instruction);
        await page.locator('#btnsend').click();
        step('submitted', `generation ${gen}`);
        await page.waitForFunction(() => pending_response_id !== '', null, { timeout: 10000 }).catch(() => {});
        if (args.abort && gen === 1) {
            await sleep(Number(args['abort-after']) * 1000);
            result.text_before_abort = await storyText();
            await page.locator('#abortgen').click().catch(async () => page.evaluate(() => abort_generation()));
            step(`aborted after ${args['abort-after']} s`, JSON.stringify(result.text_before_abort.slice(-200)));
            await sleep(3000);
        } else {
            const deadline = Date.now() + Number(args.timeout) * 1000;
            while (Date.now() < deadline && await generating()) await sleep(1000);
            await sleep(1000);
        }
        result.story = await storyText();
        result.stories.push(result.story);
        step('story', JSON.stringify(result.story.slice(-400)));
        await shoot(page, args.shots, `${name}-3-result${gen > 1 ? '-' + gen : ''}`);
    }
    result.message_box = await dismissMessageBox('after generation');
    await endRun({ page, browser, seen, shots: args.shots, name, result, step });
} catch (error) {
    await endRun({ page, browser, seen, shots: args.shots, name, result, step, error });
}
