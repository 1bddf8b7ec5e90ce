#!/usr/bin/env node
// Headless-browser login driver for the end-to-end tests of the authenticating proxy.
//
//   node login.mjs --url <proxy URL of a protected page> --user <u> --password <p>
//                  [--sign-out <proxy sign-out URL>]
//
// stdout (one line each):
//   PAGE <final url> <document.body.innerText, newlines replaced by spaces>
//   AFTER <final url after redirects>            (only with --sign-out)
// On any error: `ERROR <message>` on stderr, exit code 1. Otherwise exit code 0.
//
// Browser: $CHROMIUM or /usr/bin/chromium (system Chromium, driven by playwright-core,
// which downloads no browser), headless, --no-sandbox --disable-gpu.
import { chromium } from 'playwright-core';

const LOGIN_FORM_TIMEOUT_MS = 30_000; // provider's login form must show up within this
const RETURN_TIMEOUT_MS = 30_000;     // back on the --url origin after submitting the form
const SIGN_OUT_SETTLE_MS = 45_000;    // sign-out redirects/auto-submit (ends early once idle); never fails on timeout
const AFTER_TIMEOUT_MS = 30_000;      // the final goto --url

class UsageError extends Error {}

function parseArgs(argv) {
  const known = new Set(['url', 'user', 'password', 'sign-out']);
  const out = {};
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i];
    if (!arg.startsWith('--')) throw new UsageError(`unexpected argument: ${arg}`);
    let name = arg.slice(2);
    let value;
    const eq = name.indexOf('=');
    if (eq >= 0) {
      value = name.slice(eq + 1);
      name = name.slice(0, eq);
    } else {
      if (i + 1 >= argv.length) throw new UsageError(`--${name} needs a value`);
      value = argv[++i];
    }
    if (!known.has(name)) throw new UsageError(`unknown option: --${name}`);
    out[name] = value;
  }
  for (const required of ['url', 'user', 'password']) {
    if (out[required] === undefined) {
      throw new UsageError(
        `missing --${required}; usage: node login.mjs --url <u> --user <u> --password <p> [--sign-out <u>]`,
      );
    }
  }
  for (const name of ['url', 'sign-out']) {
    if (out[name] === undefined) continue;
    try {
      new URL(out[name]);
    } catch {
      throw new UsageError(`--${name} is not an absolute URL: ${out[name]}`);
    }
  }
  return out;
}

// One line, without Playwright's multi-line "Call log" tail.
function oneLine(err) {
  const msg = String(err && err.message ? err.message : err);
  return msg.split(/\n\s*Call log:/)[0].replace(/\s*[\r\n]+\s*/g, ' ').trim();
}

const isTimeout = (err) => err && err.name === 'TimeoutError';

async function login(page, args) {
  const target = new URL(args.url);

  await page.goto(args.url, { waitUntil: 'load', timeout: LOGIN_FORM_TIMEOUT_MS });
  try {
    await page.locator('#login-form').waitFor({ state: 'visible', timeout: LOGIN_FORM_TIMEOUT_MS });
  } catch (err) {
    if (isTimeout(err)) {
      throw new Error(`login form #login-form not visible after ${LOGIN_FORM_TIMEOUT_MS} ms; page is ${page.url()}`);
    }
    throw err;
  }
  await page.fill('#login', args.user);
  await page.fill('#password', args.password);

  // Back on the --url origin (load done), or the provider rejected the credentials
  // (403 with the form again and #error) - whichever happens first.
  const back = page
    .waitForURL((u) => u.origin === target.origin, { waitUntil: 'load', timeout: RETURN_TIMEOUT_MS })
    .then(() => 'back');
  const rejected = page
    .locator('#error')
    .waitFor({ state: 'visible', timeout: RETURN_TIMEOUT_MS })
    .then(() => 'rejected');
  back.catch(() => {});
  rejected.catch(() => {});
  await page.click('#submit');

  let outcome;
  try {
    outcome = await Promise.any([back, rejected]);
  } catch {
    throw new Error(`not back on ${target.origin} ${RETURN_TIMEOUT_MS} ms after submitting the login form; page is ${page.url()}`);
  }
  if (outcome === 'rejected' && new URL(page.url()).origin !== target.origin) {
    const text = (await page.locator('#error').innerText().catch(() => '')).trim();
    throw new Error(`login rejected by the provider: ${text || '#error shown'} (page ${page.url()})`);
  }

  const text = await page.evaluate(() => (document.body ? document.body.innerText : ''));
  process.stdout.write(`PAGE ${page.url()} ${text.replace(/\r\n|\r|\n/g, ' ').trim()}\n`);
}

async function signOut(page, args) {
  const deadline = Date.now() + SIGN_OUT_SETTLE_MS;
  const left = () => Math.max(1, deadline - Date.now());

  // proxy sign-out -> provider end-session page (auto-submits a form) -> confirm -> 303
  // to the post-logout redirect. The auto-submit may abort the first navigation
  // (net::ERR_ABORTED / "interrupted by another navigation"); that is expected.
  try {
    await page.goto(args['sign-out'], { waitUntil: 'load', timeout: left() });
  } catch (err) {
    const msg = String(err && err.message);
    if (!isTimeout(err) && !/ERR_ABORTED|interrupted by another navigation|frame was detached/i.test(msg)) {
      throw err;
    }
  }
  // Let the auto-submitted logout form and the redirects that follow finish.
  await page.waitForLoadState('networkidle', { timeout: left() }).catch(() => {});
  // If we are still on the end-session form page (the submit has not left yet), wait for it to go.
  const onLogoutForm = await page.locator('form[id="op.logoutForm"]').count().catch(() => 0);
  if (onLogoutForm > 0) {
    const from = page.url();
    await page.waitForURL((u) => u.href !== from, { waitUntil: 'load', timeout: left() }).catch(() => {});
    await page.waitForLoadState('networkidle', { timeout: left() }).catch(() => {});
  }

  await page.goto(args.url, { waitUntil: 'load', timeout: AFTER_TIMEOUT_MS });
  process.stdout.write(`AFTER ${page.url()}\n`);
}

async function main() {
  const args = parseArgs(process.argv.slice(2));
  const executablePath = process.env.CHROMIUM || '/usr/bin/chromium';
  let browser;
  try {
    browser = await chromium.launch({
      executablePath,
      headless: true,
      args: ['--no-sandbox', '--disable-gpu'],
      timeout: 60_000,
    });
    const context = await browser.newContext();
    const page = await context.newPage();
    await login(page, args);
    if (args['sign-out'] !== undefined) await signOut(page, args);
  } finally {
    if (browser) await browser.close().catch(() => {});
  }
}

main().then(
  () => process.exit(0),
  (err) => {
    process.stderr.write(`ERROR ${oneLine(err)}\n`);
    process.exit(1);
  },
);
