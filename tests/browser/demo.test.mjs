// The demo page in a real browser: headless Chromium (Debian's package, at
// /usr/bin/chromium or $CHROMIUM) opens the page from n1 of a two-node
// cluster, sees a change published over HTTP, then n1 stops and the page
// moves over to n2 and shows each change published there exactly once.
//
// Needs the ripple binary: $RIPPLE_BIN, else target/debug/ripple (scripts/test
// builds it through `cargo test`).

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { mkdtempSync, writeFileSync, existsSync, mkdirSync } from 'node:fs';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { chromium } from 'playwright-core';

const ROOT = resolve(import.meta.dirname, '..', '..');
const BIN = process.env.RIPPLE_BIN || join(ROOT, 'target', 'debug', 'ripple');
const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';
const KEY = 'dev-publish-key';
const SECRET = 'ripple-development-secret-do-not-use-in-production';

/** A port nobody listens on right now. */
function freePort() {
  return new Promise((ok, fail) => {
    const server = createServer();
    server.once('error', fail);
    server.listen(0, '127.0.0.1', () => {
      const { port } = server.address();
      server.close(() => ok(port));
    });
  });
}

/** Polls `check` until it returns a truthy value, failing after `ms`. */
async function until(what, ms, check) {
  const deadline = Date.now() + ms;
  let last;
  while (Date.now() < deadline) {
    try {
      last = await check();
      if (last) return last;
    } catch (error) {
      last = error;
    }
    await new Promise((r) => setTimeout(r, 50));
  }
  throw new Error(`timed out waiting for ${what} (last: ${last})`);
}

async function startCluster() {
  const dir = mkdtempSync(join(tmpdir(), 'ripple-browser-'));
  const nodes = [];
  for (const id of ['n1', 'n2']) {
    nodes.push({
      id,
      http: await freePort(),
      bus: await freePort(),
      repair: await freePort(),
    });
  }
  const config = [
    '[cluster]',
    `secret = "${SECRET}"`,
    `jwt_secret = "${SECRET}"`,
    `publish_keys = ["${KEY}"]`,
    'dev = true',
    ...nodes.flatMap((n) => [
      '[[nodes]]',
      `id = "${n.id}"`,
      `http = "127.0.0.1:${n.http}"`,
      `bus = "tcp://127.0.0.1:${n.bus}"`,
      `repair = "tcp://127.0.0.1:${n.repair}"`,
    ]),
  ].join('\n');
  const file = join(dir, 'cluster.toml');
  writeFileSync(file, config);
  for (const node of nodes) {
    node.url = `http://127.0.0.1:${node.http}`;
    node.process = spawn(BIN, ['serve', '--config', file, '--node', node.id], {
      stdio: ['ignore', 'ignore', 'inherit'],
      env: { ...process.env, RUST_LOG: process.env.RUST_LOG || 'warn,zeromq=error' },
    });
  }
  for (const node of nodes) {
    await until(`${node.id} to be ready`, 15000, async () => {
      const health = await (await fetch(`${node.url}/healthz`)).json();
      return health.peers.every((p) => p.up);
    });
  }
  return nodes;
}

async function publish(node, change) {
  const response = await fetch(`${node.url}/v1/publish`, {
    method: 'POST',
    headers: { 'Content-Type': 'application/json', Authorization: `Bearer ${KEY}` },
    body: JSON.stringify(change),
  });
  assert.equal(response.status, 200, await response.clone().text());
  const { positions } = await response.json();
  return positions[0].join(':');
}

test('the demo page shows live changes and follows the cluster', { timeout: 90000 }, async () => {
  assert.ok(existsSync(BIN), `no ripple binary at ${BIN}: run cargo build first`);
  assert.ok(existsSync(CHROMIUM), `no Chromium at ${CHROMIUM}: apt-get install chromium`);
  const [n1, n2] = await startCluster();
  const browser = await chromium.launch({
    executablePath: CHROMIUM,
    args: [
      '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync',
    ],
  });
  try {
    const page = await browser.newPage();
    page.on('pageerror', (error) => console.error('page error:', error));
    await page.goto(`${n1.url}/?workspace=acme&autoconnect=1`);
    await page.waitForFunction(() => document.querySelector('#state').textContent === 'open');
    assert.equal(await page.textContent('#node'), 'n1');

    const first = await publish(n1, { workspace: 'acme', record: 'r1', kind: 'insert' });
    await page.waitForSelector(`tr.change[data-pos="${first}"]`, { timeout: 10000 });

    // Stop n1 gracefully: its sessions are told to go elsewhere (4009).
    const exited = new Promise((r) => n1.process.once('exit', r));
    n1.process.kill('SIGTERM');
    await exited;

    const later = [];
    for (let i = 0; i < 3; i++) {
      later.push(await publish(n2, { workspace: 'acme', record: `r${i + 2}`, kind: 'update' }));
    }
    await page.waitForFunction(() => document.querySelector('#node').textContent === 'n2', null, {
      timeout: 20000,
    });
    for (const pos of later) {
      await page.waitForSelector(`tr.change[data-pos="${pos}"]`, { timeout: 10000 });
    }
    // A fence: once it shows, everything before it has been rendered.
    const fence = await publish(n2, { workspace: 'acme', record: 'fence' });
    await page.waitForSelector(`tr.change[data-pos="${fence}"]`, { timeout: 10000 });
    const shown = await page.$$eval('tr.change', (rows) => rows.map((r) => r.dataset.pos));
    assert.deepEqual([...shown].sort(), [first, ...later, fence].sort(), 'each change once');

    if (process.env.RIPPLE_SCREENSHOT) {
      mkdirSync(resolve(process.env.RIPPLE_SCREENSHOT, '..'), { recursive: true });
      await page.screenshot({ path: process.env.RIPPLE_SCREENSHOT, fullPage: true });
    }
  } finally {
    await browser.close();
    for (const node of [n1, n2]) node.process.kill('SIGKILL');
  }
});
