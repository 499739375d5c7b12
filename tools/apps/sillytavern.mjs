// Drives SillyTavern's own web UI (a running SillyTavern server) the way a user sets it up:
// API "Text Completion", an API type, our server's URL, Connect, the default character, the chat's
// CFG panel, one message, wait for the reply, screenshots. What the page saw (toasts, failed
// requests) and the reply go to <shots>/<name>.json; run proxy.mjs in front of the server to
// see the wire.
//
// usage: node sillytavern.mjs --st http://127.0.0.1:8123 --server http://127.0.0.1:5152 \
//          --type ooba|koboldcpp|llamacpp|tabby [--stream] [--logprobs] [--scale 1.5] \
//          [--negative "..."] [--tokens 60] [--context 2048] [--shots /work/apps/shots] [--name st-ooba] \
//          [--new-chat] [--messages 2] [--banned '"word"'] [--regenerate]
// --new-chat starts the character's chat afresh (so a second message shares the first one's prompt);
// --messages N sends N messages one after another in the chat (turn 2 should reuse turn 1's prompt);
// --banned fills Text Completion's "Banned Tokens" box (lines; a line in double quotes is a string);
// --regenerate regenerates the chat's last reply instead of sending a message.
import { parseArgs } from 'node:util';
import { openBrowser, watchPage, shoot, endRun, sleep, commonOptions } from './browser.mjs';

const { values: args } = parseArgs({
    options: {
        ...commonOptions,
        st: { type: 'string', default: 'http://127.0.0.1:8123' },
        type: { type: 'string', default: 'ooba' },
        stream: { type: 'boolean', default: false },
        logprobs: { type: 'boolean', default: false },
        scale: { type: 'string', default: '1.5' },
        negative: { type: 'string', default: 'Write short, dull replies in the past tense.' },
        message: { type: 'string', default: 'Seraphina, tell me about the forest. What lives there?' },
        // the messages after the first (--messages)
        'next-message': { type: 'string', default: 'Who else guards the forest with you?' },
        // SillyTavern's "Context (tokens)": smaller prompts for a slow CPU
        context: { type: 'string', default: '2048' },
        'new-chat': { type: 'boolean', default: false },
        messages: { type: 'string', default: '1' },
        banned: { type: 'string', default: '' },
        regenerate: { type: 'boolean', default: false },
    },
});
const name = args.name ?? `st-${args.type}${args.stream ? '-stream' : ''}${args.logprobs ? '-logprobs' : ''}`;
// each API type keeps its own URL field in SillyTavern
const urlField = {
    ooba: '#textgenerationwebui_api_url_text', koboldcpp: '#koboldcpp_api_url_text',
    llamacpp: '#llamacpp_api_url_text', tabby: '#tabby_api_url_text',
}[args.type];
if (!urlField) throw new Error(`--type: one of ooba, koboldcpp, llamacpp, tabby (got ${args.type})`);

const result = { name, type: args.type, server: args.server, steps: [] };
const step = (what, detail = '') => { result.steps.push(`${what}${detail ? ': ' + detail : ''}`); console.log(what, detail); };

const { browser, context } = await openBrowser();
const page = await context.newPage();
const seen = watchPage(page, name);
try {
    await page.goto(args.st, { waitUntil: 'domcontentloaded' });
    await page.waitForSelector('#send_textarea', { timeout: 60000 });
    await page.waitForFunction(() => !document.getElementById('preloader'), null, { timeout: 60000 });
    step('SillyTavern loaded', await page.evaluate(() => document.title));

    // first run: SillyTavern asks for the user's name
    const onboarding = page.locator('dialog.popup[open] .popup-input');
    if (await onboarding.count()) {
        await onboarding.fill('Writer');
        await page.locator('dialog.popup[open] .popup-button-ok').click();
        step('onboarding answered');
        await sleep(500);
    }

    // API Connections drawer: API, type, URL, Connect
    await page.locator('#sys-settings-button .drawer-toggle').click();
    await page.selectOption('#main_api', 'textgenerationwebui');
    await page.selectOption('#textgen_type', args.type);
    await page.fill(urlField, args.server);
    // close the URL field's server-history list, which covers the Connect button
    await page.evaluate(() => document.activeElement?.blur());
    await page.locator('#api_button_textgenerationwebui').scrollIntoViewIfNeeded();
    await sleep(300);
    // a status check SillyTavern started at load disables Connect until it ends (its Cancel button
    // shows); wait for it, and cancel it if it hangs, as a user would
    const enabled = () => page.waitForFunction(
        () => !document.getElementById('api_button_textgenerationwebui')?.classList.contains('disabled'),
        null, { timeout: 20000 }).then(() => true, () => false);
    if (!(await enabled())) {
        step('a status check from the page load is still running; Cancel');
        await page.locator('#textgenerationwebui_api .api_loading').click();
        await enabled();
    }
    await page.locator('#api_button_textgenerationwebui').click();
    const status = page.locator('#textgenerationwebui_api .online_status_text');
    await page.waitForFunction(() => {
        const t = document.querySelector('#textgenerationwebui_api .online_status_text')?.textContent ?? '';
        return t && !/^(Not connected|No connection)/.test(t.trim()) ? true : false;
    }, null, { timeout: 30000 }).catch(() => {});
    result.connection_status = (await status.textContent())?.trim();
    step('connect', result.connection_status);
    await shoot(page, args.shots, `${name}-1-connect`);

    // response length, streaming and token probabilities, as set in the UI panels
    await page.evaluate(({ tokens, context, stream, logprobs, banned }) => {
        const $ = window.jQuery;
        $('#amount_gen').val(tokens).trigger('input');
        $('#max_context').val(context).trigger('input');
        $('#streaming_textgenerationwebui').prop('checked', stream).trigger('input');
        $('#request_token_probabilities').prop('checked', logprobs).trigger('input');
        // Text Completion settings -> "Banned Tokens" (ooba, tabby, ... types)
        $('#banned_tokens_textgenerationwebui').val(banned).trigger('input');
    }, { tokens: Number(args.tokens), context: Number(args.context), stream: args.stream, logprobs: args.logprobs,
        banned: args.banned.replaceAll('\\n', '\n') });
    if (args.banned) step('banned tokens box', JSON.stringify(args.banned));
    await page.locator('#sys-settings-button .drawer-toggle').click();

    // the default character (its one chat: earlier runs' messages stay in it, cut to the context)
    await page.evaluate(() => {
        const $ = window.jQuery;
        const card = $('.character_select').filter((i, e) => $(e).find('.ch_name').text().trim() === 'Seraphina');
        card.first().trigger('click');
    });
    await page.waitForFunction(() => document.querySelectorAll('#chat .mes').length > 0, null, { timeout: 30000 });
    step('character opened', await page.locator('#chat .mes .name_text').first().textContent());
    if (args['new-chat']) {
        await page.locator('#options_button').click();
        await page.locator('#option_start_new_chat').click();
        await page.locator('dialog.popup[open] .popup-button-ok').click();
        await page.waitForFunction(() => document.querySelectorAll('#chat .mes').length === 1, null, { timeout: 30000 });
        step('new chat started');
        // the confirm popup fades out and the chat reloads before the options menu answers again
        await page.waitForSelector('dialog.popup[open]', { state: 'detached', timeout: 10000 }).catch(() => {});
        await sleep(2000);
    }

    // the chat's CFG panel (options menu left of the chat box -> CFG Scale)
    await page.locator('#options_button').click();
    await page.locator('#option_toggle_CFG').click();
    await page.waitForSelector('#cfgConfig', { state: 'visible' });
    await page.evaluate((scale) => {
        const $ = window.jQuery;
        $('#chat_cfg_guidance_scale').val(scale).trigger('input');
    }, Number(args.scale));
    await page.fill('#chat_cfg_negative_prompt', args.negative);
    await sleep(500);
    result.cfg_panel = await page.evaluate(() => ({
        scale: document.querySelector('#chat_cfg_guidance_scale_counter')?.value,
        negative: document.querySelector('#chat_cfg_negative_prompt')?.value,
    }));
    step('chat CFG set', JSON.stringify(result.cfg_panel));
    await shoot(page, args.shots, `${name}-2-cfg-panel`);
    await page.locator('#CFGClose').click().catch(() => {});

    result.replies = [];
    const turns = args.regenerate ? 1 : Number(args.messages);
    for (let turn = 1; turn <= turns; turn++) {
        // send (or regenerate) and wait for the reply (the stop button shows while generating)
        const before = await page.locator('#chat .mes').count();
        if (args.regenerate) {
            await page.locator('#options_button').click();
            await page.locator('#option_regenerate').click();
            step('regenerate clicked');
        } else {
            await page.fill('#send_textarea', turn === 1 ? args.message : args['next-message']);
            // the send button only shows when SillyTavern thinks it is connected; Enter sends regardless
            if (await page.locator('#send_but').isVisible()) await page.locator('#send_but').click();
            else { step('send button hidden (not connected); pressing Enter'); await page.locator('#send_textarea').press('Enter'); }
            step('message sent', `turn ${turn}`);
        }
        const deadline = Date.now() + Number(args.timeout) * 1000;
        await page.waitForSelector('#mes_stop', { state: 'visible', timeout: 15000 }).catch(() => {});
        while (Date.now() < deadline) {
            const busy = await page.locator('#mes_stop').isVisible();
            if (!busy) break;
            await sleep(1000);
        }
        await sleep(1500);
        const after = await page.locator('#chat .mes').count();
        // a regenerated reply replaces the last message; a sent message adds two
        result.reply = after >= before + (args.regenerate ? 0 : 2)
            ? (await page.locator('#chat .mes').last().locator('.mes_text').innerText()).trim()
            : null;
        result.replies.push(result.reply);
        result.toasts = await page.locator('#toast-container .toast').allInnerTexts();
        step('reply', result.reply === null ? 'NONE' : JSON.stringify(result.reply.slice(0, 300)));
        if (result.toasts.length) step('toasts', JSON.stringify(result.toasts));
        await shoot(page, args.shots, `${name}-3-reply${turns > 1 ? '-' + turn : ''}`);
    }

    if (args.logprobs) {
        await page.locator('#options_button').click();
        await page.locator('#option_toggle_logprobs').click();
        await sleep(500);
        // click the first token of the reply, as a user does to see its alternatives
        await page.locator('#logprobsViewer .logprobs_output_token').first().click().catch(() => {});
        await sleep(500);
        result.logprobs_panel = (await page.locator('#logprobsViewer').innerText().catch(() => '')).slice(0, 1500);
        step('logprobs panel', JSON.stringify(result.logprobs_panel.slice(0, 300)));
        await shoot(page, args.shots, `${name}-4-logprobs`);
    }
    await endRun({ page, browser, seen, shots: args.shots, name, result, step });
} catch (error) {
    await endRun({ page, browser, seen, shots: args.shots, name, result, step, error });
}
