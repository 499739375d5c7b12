// What both app drivers share: a headless Chromium from the system (playwright-core brings no
// browser of its own), a log of what the page saw (console errors, failed requests, toasts), and
// screenshots named after the run.
import fs from 'node:fs';
import path from 'node:path';
import { chromium } from 'playwright-core';

export async function openBrowser() {
    const executablePath = process.env.CHROMIUM ?? '/usr/bin/chromium';
    const browser = await chromium.launch({ executablePath, args: ['--no-sandbox'] });
    const context = await browser.newContext({ viewport: { width: 1400, height: 1000 } });
    return { browser, context };
}

/** Collects, per page, what a user would notice going wrong: console errors and HTTP errors. */
export function watchPage(page, label) {
    const seen = { console: [], http: [], label };
    page.on('console', (msg) => {
        if (msg.type() === 'error' || msg.type() === 'warning') {
            seen.console.push(`${msg.type()}: ${msg.text().slice(0, 500)}`);
        }
    });
    page.on('pageerror', (err) => seen.console.push(`pageerror: ${String(err).slice(0, 500)}`));
    page.on('response', async (res) => {
        if (res.status() >= 400) {
            let text = '';
            try { text = (await res.text()).slice(0, 500); } catch { /* body gone */ }
            seen.http.push(`${res.status()} ${res.request().method()} ${res.url()} ${text}`);
        }
    });
    page.on('requestfailed', (req) => seen.http.push(`FAILED ${req.method()} ${req.url()} ${req.failure()?.errorText}`));
    return seen;
}

export function shotPath(dir, name) {
    fs.mkdirSync(dir, { recursive: true });
    return path.join(dir, `${name}.png`);
}

export async function shoot(page, dir, name) {
    const file = shotPath(dir, name);
    await page.screenshot({ path: file, fullPage: false });
    console.log(`screenshot ${file}`);
    return file;
}

export function writeResult(dir, name, result) {
    const file = path.join(dir, `${name}.json`);
    fs.writeFileSync(file, JSON.stringify(result, null, 2));
    console.log(`result ${file}`);
}

/** Ends a driver run whatever happened: the error (if any) and what the page saw go into the result file. */
export async function endRun({ page, browser, seen, shots, name, result, step, error }) {
    if (error) {
        step('DRIVER ERROR', String(error).split('\n')[0]);
        await shoot(page, shots, `${name}-error`).catch(() => {});
    }
    result.page_console = seen.console;
    result.page_http_errors = seen.http;
    writeResult(shots, name, result);
    await browser.close();
}

/** The command-line options every driver takes (parseArgs format). */
export const commonOptions = {
    server: { type: 'string', default: 'http://127.0.0.1:5000' },
    tokens: { type: 'string', default: '60' },
    shots: { type: 'string', default: '/work/apps/shots' },
    name: { type: 'string' },
    timeout: { type: 'string', default: '300' },
};

export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
