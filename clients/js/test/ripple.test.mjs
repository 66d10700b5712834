// Tests of the client's pure logic (codec, cursor, backoff) and of its session
// flow against a scripted in-memory WebSocket. Run: node --test clients/js/test/
import { test, afterEach } from 'node:test';
import assert from 'node:assert/strict';

import {
  RippleClient, MsgpackExt, SUBPROTOCOLS, encodeMsgpack, decodeMsgpack, acceptPosition,
  cursorFromObject, cursorToObject, changesOf, backoffDelay, normalizeInterest, interestKey,
  isPosition, formatPosition,
} from '../ripple.js';

const hex = (bytes) => Buffer.from(bytes).toString('hex');
const roundtrip = (v) => decodeMsgpack(encodeMsgpack(v));

// ---------------------------------------------------------------------------
// MessagePack
// ---------------------------------------------------------------------------

test('msgpack: integers take the smallest form and come back unchanged', () => {
  const cases = [
    [0, '00'], [127, '7f'], [128, 'cc80'], [255, 'ccff'], [256, 'cd0100'],
    [65535, 'cdffff'], [65536, 'ce00010000'], [2 ** 32 - 1, 'ceffffffff'],
    [2 ** 32, 'cf0000000100000000'], [-1, 'ff'], [-32, 'e0'], [-33, 'd0df'],
    [-128, 'd080'], [-129, 'd1ff7f'], [-32768, 'd18000'], [-32769, 'd2ffff7fff'],
    [-(2 ** 31), 'd280000000'], [-(2 ** 31) - 1, 'd3ffffffff7fffffff'],
    [Number.MAX_SAFE_INTEGER, 'cf001fffffffffffff'],
  ];
  for (const [value, bytes] of cases) {
    assert.equal(hex(encodeMsgpack(value)), bytes, `encoding ${value}`);
    assert.equal(roundtrip(value), value);
  }
});

test('msgpack: 64-bit integers are Numbers when safe, BigInt otherwise', () => {
  assert.equal(roundtrip(2n ** 53n + 1n), 2n ** 53n + 1n);
  assert.equal(roundtrip(2n ** 64n - 1n), 2n ** 64n - 1n);
  assert.equal(roundtrip(-(2n ** 63n)), -(2n ** 63n));
  assert.equal(roundtrip(42n), 42);
  assert.equal(decodeMsgpack(Uint8Array.from([0xcf, 0, 0, 0, 0, 0, 0, 0, 7])), 7);
  assert.equal(decodeMsgpack(Uint8Array.from([0xd3, 255, 255, 255, 255, 255, 255, 255, 255])), -1);
  assert.throws(() => encodeMsgpack(2n ** 64n), RangeError);
  assert.throws(() => encodeMsgpack(-(2n ** 63n) - 1n), RangeError);
});

test('msgpack: floats, nil and booleans', () => {
  assert.equal(hex(encodeMsgpack(1.5)), 'cb3ff8000000000000');
  assert.equal(roundtrip(-0.1), -0.1);
  assert.ok(Object.is(roundtrip(-0), -0));
  assert.ok(Number.isNaN(roundtrip(NaN)));
  assert.equal(roundtrip(Infinity), Infinity);
  assert.equal(roundtrip(2 ** 60), 2 ** 60);
  // float32 is only decoded; the encoder always writes float64.
  assert.equal(decodeMsgpack(Uint8Array.from([0xca, 0x3f, 0xc0, 0, 0])), 1.5);
  assert.equal(hex(encodeMsgpack(null)), 'c0');
  assert.equal(hex(encodeMsgpack(undefined)), 'c0');
  assert.equal(roundtrip(true), true);
  assert.equal(roundtrip(false), false);
  assert.equal(roundtrip(null), null);
});

test('msgpack: strings of every length class, including UTF-8', () => {
  for (const [len, head] of [[0, 'a0'], [31, 'bf'], [32, 'd920'], [255, 'd9ff'],
    [256, 'da0100'], [65536, 'db00010000']]) {
    const s = 'x'.repeat(len);
    assert.ok(hex(encodeMsgpack(s)).startsWith(head), `string of ${len}`);
    assert.equal(roundtrip(s), s);
  }
  assert.equal(roundtrip('héllo wörld ✓ 🌊'), 'héllo wörld ✓ 🌊');
  assert.throws(() => decodeMsgpack(Uint8Array.from([0xa2, 0xc3, 0x28])), TypeError);
});

test('msgpack: bin from Uint8Array, ArrayBuffer and other views', () => {
  const bytes = Uint8Array.from({ length: 300 }, (_, i) => i % 256);
  const back = roundtrip(bytes);
  assert.ok(back instanceof Uint8Array);
  assert.deepEqual(back, bytes);
  assert.ok(hex(encodeMsgpack(bytes)).startsWith('c5012c'));
  assert.deepEqual(roundtrip(new Uint8Array([1, 2]).buffer), Uint8Array.from([1, 2]));
  assert.equal(hex(encodeMsgpack(new Uint8Array(0))), 'c400');
  // A view into a larger buffer encodes only its own bytes.
  const view = new Uint8Array([9, 8, 7, 6]).subarray(1, 3);
  assert.deepEqual(roundtrip(view), Uint8Array.from([8, 7]));
  assert.equal(hex(encodeMsgpack(Uint16Array.from([0x0102]))).slice(0, 4), 'c402');
});

test('msgpack: arrays and maps, small and large, nested', () => {
  const value = {
    op: 'change',
    pos: ['n1', 17, 1043],
    lists: Array.from({ length: 20 }, (_, i) => `l${i}`),
    data: { nested: { deeper: [1, [2, [3, { x: null }]]] }, flag: true, bin: Uint8Array.of(1) },
  };
  assert.deepEqual(roundtrip(value), value);

  const big = Object.fromEntries(Array.from({ length: 70000 }, (_, i) => [`k${i}`, i]));
  assert.deepEqual(roundtrip(big), big);
  assert.equal(hex(encodeMsgpack(Array(16).fill(0))).slice(0, 6), 'dc0010');
  assert.equal(hex(encodeMsgpack({})), '80');
});

test('msgpack: undefined keys are left out, Maps keep their keys', () => {
  assert.deepEqual(roundtrip({ a: 1, b: undefined }), { a: 1 });
  assert.deepEqual(roundtrip(new Map([['a', 1], [2, 'two']])), { a: 1, 2: 'two' });
  assert.deepEqual(roundtrip([undefined]), [null]);
});

test('msgpack: a "__proto__" key is data, not a prototype', () => {
  const bytes = encodeMsgpack(new Map([['__proto__', { polluted: true }]]));
  const out = decodeMsgpack(bytes);
  assert.equal(Object.getPrototypeOf(out), Object.prototype);
  assert.deepEqual(Object.keys(out), ['__proto__']);
  assert.equal({}.polluted, undefined);
});

test('msgpack: ext values surface as {type, data}', () => {
  for (const len of [1, 2, 4, 8, 16, 3, 300, 70000]) {
    const ext = new MsgpackExt(-1, Uint8Array.from({ length: len }, (_, i) => i & 0xff));
    const back = roundtrip(ext);
    assert.ok(back instanceof MsgpackExt);
    assert.equal(back.type, -1);
    assert.deepEqual(back.data, ext.data);
  }
  assert.equal(hex(encodeMsgpack(new MsgpackExt(5, Uint8Array.of(0xaa)))), 'd405aa');
  assert.equal(hex(encodeMsgpack(new MsgpackExt(5, Uint8Array.of(1, 2, 3)))), 'c70305010203');
});

test('msgpack: bad input is refused, not guessed at', () => {
  assert.throws(() => decodeMsgpack(new Uint8Array(0)), RangeError);
  assert.throws(() => decodeMsgpack(Uint8Array.of(0xcd, 0x01)), RangeError);
  assert.throws(() => decodeMsgpack(Uint8Array.of(0x92, 0x01)), RangeError);
  assert.throws(() => decodeMsgpack(Uint8Array.of(0x01, 0x02)), /trailing/);
  assert.throws(() => decodeMsgpack(Uint8Array.of(0xc1)), /not a valid type/);
  assert.throws(() => decodeMsgpack(Uint8Array.of(0xdd, 0xff, 0xff, 0xff, 0xff)), RangeError);
  assert.throws(() => encodeMsgpack(() => 1), TypeError);
  const deep = new Uint8Array(1000).fill(0x91);
  assert.throws(() => decodeMsgpack(deep), /nested too deeply/);
  const cyclic = [];
  cyclic.push(cyclic);
  assert.throws(() => encodeMsgpack(cyclic), /nested too deeply/);
});

// ---------------------------------------------------------------------------
// Cursor and positions
// ---------------------------------------------------------------------------

test('cursor: a change is handed over once, in seq order per origin', () => {
  const cursor = cursorFromObject({ n1: [17, 100] });
  assert.equal(acceptPosition(cursor, ['n1', 17, 100]), false, 'at the cursor');
  assert.equal(acceptPosition(cursor, ['n1', 17, 99]), false, 'before the cursor');
  assert.equal(acceptPosition(cursor, ['n1', 17, 101]), true);
  assert.equal(acceptPosition(cursor, ['n1', 17, 101]), false, 'the same twice');
  assert.equal(acceptPosition(cursor, ['n1', 17, 105]), true, 'gaps are not ours to judge');
  assert.deepEqual(cursorToObject(cursor), { n1: [17, 105] });
});

test('cursor: a new origin or a new epoch is accepted', () => {
  const cursor = cursorFromObject({ n1: [17, 100] });
  assert.equal(acceptPosition(cursor, ['n2', 3, 1]), true);
  assert.equal(acceptPosition(cursor, ['n1', 18, 1]), true, 'origin restarted');
  assert.equal(acceptPosition(cursor, ['n1', 18, 1]), false);
  assert.deepEqual(cursorToObject(cursor), { n1: [18, 1], n2: [3, 1] });
});

test('cursor: BigInt and Number compare by value', () => {
  const big = 2n ** 60n;
  const cursor = cursorFromObject({ n1: [big, 5] });
  assert.equal(acceptPosition(cursor, ['n1', big, 5n]), false);
  assert.equal(acceptPosition(cursor, ['n1', big, 6n]), true);
  const small = cursorFromObject({ n1: [7, 5] });
  assert.equal(acceptPosition(small, ['n1', 7n, 5n]), false, '7n is epoch 7');
});

test('cursor: malformed entries are skipped, output is a fresh copy', () => {
  const cursor = cursorFromObject({
    ok: [1, 2], short: [1], text: ['1', 2], frac: [1.5, 2], none: null,
  });
  assert.deepEqual(cursorToObject(cursor), { ok: [1, 2] });
  assert.equal(cursorFromObject(null).size, 0);
  const out = cursorToObject(cursor);
  out.ok[1] = 99;
  assert.deepEqual(cursorToObject(cursor), { ok: [1, 2] });
});

test('positions, frames and interests', () => {
  assert.ok(isPosition(['n1', 1, 2]));
  assert.ok(isPosition(['n1', 1n, 2n]));
  assert.ok(!isPosition(['n1', 1]));
  assert.ok(!isPosition([1, 1, 2]));
  assert.equal(formatPosition(['n1', 17, 1043]), 'n1:17:1043');

  const a = { op: 'change', pos: ['n1', 1, 1] };
  assert.deepEqual(changesOf(a), [a]);
  assert.deepEqual(changesOf({ op: 'changes', items: [a, a] }), [a, a]);
  assert.deepEqual(changesOf({ op: 'welcome' }), []);
  assert.deepEqual(changesOf(null), []);

  assert.deepEqual(normalizeInterest({ workspace: 'w', list: '', extra: 1 }), { workspace: 'w' });
  assert.throws(() => normalizeInterest({ list: 'x' }), TypeError);
  assert.throws(() => normalizeInterest({ workspace: 'w', record: 5 }), TypeError);
  assert.throws(() => normalizeInterest({ workspace: 'w', list: 'l', record: 'r' }), /not both/);
  assert.equal(interestKey({ workspace: 'w', list: 'l' }),
    interestKey(normalizeInterest({ list: 'l', workspace: 'w', record: undefined })));
});

// ---------------------------------------------------------------------------
// Backoff
// ---------------------------------------------------------------------------

test('backoff: full jitter between 0 and the capped exponential', () => {
  const b = { initialMs: 250, maxMs: 10000 };
  const top = () => 0.9999999999;
  assert.equal(backoffDelay(0, b, () => 0), 0);
  assert.equal(backoffDelay(0, b, top), 249);
  assert.equal(backoffDelay(1, b, top), 499);
  assert.equal(backoffDelay(3, b, top), 1999);
  assert.equal(backoffDelay(6, b, top), 9999, 'capped at maxMs');
  assert.equal(backoffDelay(1e6, b, top), 9999, 'no overflow on long outages');
  assert.equal(backoffDelay(2, b, () => 0.5), 500);
  // A random source that returns 1 (outside its contract) still stays in bounds.
  assert.equal(backoffDelay(10, b, () => 1), 10000);

  for (let attempt = 0; attempt < 50; attempt++) {
    for (let i = 0; i < 20; i++) {
      const d = backoffDelay(attempt);
      assert.ok(d >= 0 && d <= Math.min(10000, 250 * 2 ** attempt), `attempt ${attempt}: ${d}`);
      assert.ok(Number.isInteger(d));
    }
  }
});

// ---------------------------------------------------------------------------
// Session flow against a scripted socket
// ---------------------------------------------------------------------------

/** An in-memory WebSocket; the test plays the server. */
class FakeSocket {
  static all = [];

  constructor(url, protocols) {
    this.url = url;
    this.protocols = protocols;
    this.protocol = '';
    this.sent = [];
    this.closedWith = null;
    FakeSocket.all.push(this);
  }

  send(data) {
    this.sent.push(typeof data === 'string' ? JSON.parse(data) : decodeMsgpack(data));
  }

  close(code, reason) {
    this.closedWith = { code, reason };
  }

  // Server side.
  accept(protocol = this.protocols[0]) {
    this.protocol = protocol;
    this.onopen?.({});
  }

  push(msg) {
    const binary = this.protocol === SUBPROTOCOLS.msgpack;
    const data = binary ? encodeMsgpack(msg).buffer : JSON.stringify(msg);
    this.onmessage?.({ data });
  }

  drop(code, reason = '') {
    this.onclose?.({ code, reason });
  }
}

const tick = () => new Promise((resolve) => setTimeout(resolve, 2));

async function socketNumber(n) {
  for (let i = 0; i < 500; i++) {
    if (FakeSocket.all.length > n) return FakeSocket.all[n];
    await tick();
  }
  throw new Error(`socket ${n} never opened`);
}

// Clients left running by a failed assertion would reconnect forever and
// keep the runner alive; every client is closed after its test.
const running = [];
afterEach(() => {
  while (running.length > 0) running.pop().close();
});

function makeClient(options = {}) {
  FakeSocket.all = [];
  const client = new RippleClient({
    nodes: ['ws://a/v1/ws', 'ws://b/v1/ws', 'ws://c/v1/ws'],
    token: 't0',
    interests: [{ workspace: 'acme' }],
    backoff: { initialMs: 1, maxMs: 2 },
    WebSocket: FakeSocket,
    ...options,
  });
  running.push(client);
  const events = [];
  for (const name of ['change', 'state', 'welcome', 'recovered', 'reset', 'error', 'close',
    'subscribed']) {
    client.on(name, (detail) => events.push([name, detail]));
  }
  const seen = () => events.filter(([n]) => n === 'change').map(([, c]) => formatPosition(c.pos));
  return { client, events, seen };
}

const change = (origin, epoch, seq) => ({
  op: 'change', pos: [origin, epoch, seq], ts: 1, workspace: 'acme', record: `r${seq}`,
});

test('session: fresh start, no duplicates, resume on the next node', async () => {
  const { client, events, seen } = makeClient();
  client.connect();
  assert.equal(client.state, 'connecting');

  const s0 = await socketNumber(0);
  assert.equal(s0.url, 'ws://a/v1/ws');
  assert.deepEqual(s0.protocols, ['ripple.v1.json']);
  s0.accept();
  assert.deepEqual(s0.sent, [{ op: 'hello', token: 't0' }]);

  s0.push({ op: 'welcome', node: 'n1', session: 's', position: { n1: [17, 4] }, recovered: true });
  assert.equal(client.state, 'open');
  assert.equal(client.node, 'n1');
  assert.deepEqual(client.cursor, { n1: [17, 4] });
  assert.deepEqual(s0.sent[1], { op: 'subscribe', id: 1, interests: [{ workspace: 'acme' }] });

  s0.push(change('n1', 17, 4));
  s0.push(change('n1', 17, 5));
  s0.push(change('n1', 17, 5));
  const batch = [change('n1', 17, 5), change('n1', 17, 6), change('n2', 3, 9)];
  s0.push({ op: 'changes', items: batch });
  assert.deepEqual(seen(), ['n1:17:5', 'n1:17:6', 'n2:3:9']);
  assert.deepEqual(client.cursor, { n1: [17, 6], n2: [3, 9] });

  // Node going away: the next socket goes to the next node and resumes.
  s0.drop(4009, 'going away');
  const s1 = await socketNumber(1);
  assert.equal(s1.url, 'ws://b/v1/ws');
  s1.accept();
  assert.deepEqual(s1.sent, [{
    op: 'hello', token: 't0',
    resume: { cursor: { n1: [17, 6], n2: [3, 9] }, interests: [{ workspace: 'acme' }] },
  }]);

  // A recovered welcome must not move the cursor to the node's position.
  s1.push({ op: 'welcome', node: 'n2', position: { n1: [17, 50], n2: [3, 60] },
    recovered: true, missed: 1 });
  assert.deepEqual(client.cursor, { n1: [17, 6], n2: [3, 9] });
  assert.equal(s1.sent.length, 1, 'resume subscribed everything; nothing more to send');
  s1.push(change('n1', 17, 6));
  s1.push(change('n1', 17, 7));
  assert.deepEqual(seen(), ['n1:17:5', 'n1:17:6', 'n2:3:9', 'n1:17:7']);

  const recovered = events.filter(([n]) => n === 'recovered').map(([, d]) => d);
  assert.deepEqual(recovered, [{ recovered: true, missed: 1 }]);
  assert.deepEqual(events.filter(([n]) => n === 'close').map(([, d]) => d),
    [{ code: 4009, reason: 'going away' }]);
  assert.equal(client.node, 'n2');

  client.close();
  assert.equal(client.state, 'closed');
  assert.deepEqual(s1.closedWith, { code: 1000, reason: 'client closed' });
  await tick();
  assert.equal(FakeSocket.all.length, 2, 'no reconnect after close()');
});

test('session: recovered false restarts the cursor and emits reset', async () => {
  const { client, events } = makeClient({ cursor: { n1: [5, 10] } });
  client.connect();
  const s0 = await socketNumber(0);
  s0.accept();
  assert.deepEqual(s0.sent[0].resume, {
    cursor: { n1: [5, 10] }, interests: [{ workspace: 'acme' }],
  }, 'a cursor given up front is resumed from on the first connection');

  s0.push({ op: 'welcome', node: 'n1', position: { n1: [6, 3] }, recovered: false, missed: 0 });
  assert.deepEqual(client.cursor, { n1: [6, 3] });
  const reset = events.filter(([n]) => n === 'reset').map(([, d]) => d);
  assert.deepEqual(reset, [{ position: { n1: [6, 3] }, missed: 0 }]);
  assert.deepEqual(events.find(([n]) => n === 'recovered')[1], { recovered: false, missed: 0 });
  client.close();
});

test('session: 4001 asks getToken again; failures back off round robin', async () => {
  let calls = 0;
  const { client, events } = makeClient({
    token: undefined,
    getToken: async () => {
      calls += 1;
      if (calls === 2) throw new Error('auth server down');
      return `t${calls}`;
    },
  });
  client.connect();
  const s0 = await socketNumber(0);
  s0.accept();
  assert.equal(s0.sent[0].token, 't1');
  s0.push({ op: 'welcome', node: 'n1', position: {} });

  // An ordinary close keeps the token; an expiry (4001) fetches a new one.
  s0.drop(4008, 'too slow');
  const s1 = await socketNumber(1);
  s1.accept();
  assert.equal(s1.sent[0].token, 't1');
  assert.equal(calls, 1);
  s1.drop(4001, 'token expired');

  // The second getToken call fails: reported, and the node after it is tried.
  const s2 = await socketNumber(2);
  assert.equal(s2.url, 'ws://a/v1/ws', 'c was skipped by the failed attempt, round robin');
  s2.accept();
  assert.equal(s2.sent[0].token, 't3');
  assert.equal(calls, 3);
  assert.ok(events.some(([n, d]) => n === 'error' && d.code === 'token'));
  client.close();
});

test('session: msgpack subprotocol, binary frames, BigInt epochs', async () => {
  const { client, seen } = makeClient({ format: 'msgpack' });
  client.connect();
  const s0 = await socketNumber(0);
  assert.deepEqual(s0.protocols, ['ripple.v1.msgpack']);
  s0.accept();
  assert.deepEqual(s0.sent[0], { op: 'hello', token: 't0' });

  const epoch = 2n ** 60n;
  s0.push({ op: 'welcome', node: 'n1', position: { n1: [epoch, 1] } });
  s0.push({ ...change('n1', epoch, 1), data: Uint8Array.of(1, 2) });
  s0.push({ ...change('n1', epoch, 2), data: Uint8Array.of(1, 2) });
  assert.deepEqual(seen(), [`n1:${epoch}:2`]);

  s0.drop(1006);
  const s1 = await socketNumber(1);
  s1.accept();
  assert.deepEqual(s1.sent[0].resume.cursor, { n1: [epoch, 2] });
  client.close();
});

test('session: interests changed during a hello are sent after welcome', async () => {
  const { client } = makeClient({ cursor: { n1: [1, 1] } });
  client.connect();
  const s0 = await socketNumber(0);
  s0.accept();
  assert.equal(client.subscribe({ workspace: 'acme', list: 'deals' }), null);
  client.unsubscribe({ workspace: 'acme' });
  s0.push({ op: 'welcome', node: 'n1', position: { n1: [1, 9] }, recovered: true });
  assert.deepEqual(s0.sent.slice(1), [
    { op: 'subscribe', id: 1, interests: [{ workspace: 'acme', list: 'deals' }] },
    { op: 'unsubscribe', id: 2, interests: [{ workspace: 'acme' }] },
  ]);

  assert.equal(client.subscribe([{ workspace: 'acme', list: 'deals' }]), null, 'already held');
  assert.equal(client.subscribe({ workspace: 'acme', record: 'r1' }), 3);
  assert.deepEqual(client.interests, [
    { workspace: 'acme', list: 'deals' }, { workspace: 'acme', record: 'r1' },
  ]);
  client.close();
});

test('session: an undecodable frame reconnects and resumes', async () => {
  const { client, events } = makeClient();
  client.connect();
  const s0 = await socketNumber(0);
  s0.accept();
  s0.push({ op: 'welcome', node: 'n1', position: { n1: [1, 1] } });
  s0.onmessage({ data: '{not json' });
  assert.equal(s0.closedWith.code, 4002);
  assert.ok(events.some(([n, d]) => n === 'error' && d.code === 'decode'));
  const s1 = await socketNumber(1);
  s1.accept();
  assert.deepEqual(s1.sent[0].resume.cursor, { n1: [1, 1] });
  client.close();
});

test('session: no welcome in time moves on to the next node', async () => {
  const { client } = makeClient({ welcomeTimeoutMs: 5 });
  client.connect();
  const s0 = await socketNumber(0);
  s0.accept();
  const s1 = await socketNumber(1);
  assert.equal(s0.closedWith.code, 4000);
  assert.equal(s1.url, 'ws://b/v1/ws');
  client.close();
});

test('session: a refused subscribe drops its interests so resumes stay valid', async () => {
  const { client, events } = makeClient();
  client.connect();
  const s0 = await socketNumber(0);
  s0.accept();
  s0.push({ op: 'welcome', node: 'n1', position: { n1: [1, 1] } });
  s0.push({ op: 'subscribed', id: 1 });

  const id = client.subscribe([{ workspace: 'secret' }, { workspace: 'acme', list: 'x' }]);
  s0.push({ op: 'error', id, code: 'forbidden', message: 'no' });
  const error = events.find(([n]) => n === 'error')[1];
  assert.deepEqual(error.interests, [{ workspace: 'secret' }, { workspace: 'acme', list: 'x' }]);
  assert.deepEqual(client.interests, [{ workspace: 'acme' }]);

  s0.drop(4008);
  const s1 = await socketNumber(1);
  s1.accept();
  assert.deepEqual(s1.sent[0].resume.interests, [{ workspace: 'acme' }]);
});

test('session: a refused resume resets and subscribes each interest alone', async () => {
  const { client, events } = makeClient({
    cursor: { n1: [1, 5] },
    interests: [{ workspace: 'acme' }, { workspace: 'secret' }],
  });
  client.connect();
  const s0 = await socketNumber(0);
  s0.accept();
  assert.equal(s0.sent[0].resume.interests.length, 2);

  // What the node does: an error without id, then a welcome for a session
  // that holds no interests.
  s0.push({ op: 'error', code: 'forbidden', message: 'interest secret: not granted' });
  s0.push({ op: 'welcome', node: 'n1', position: { n1: [1, 9] }, recovered: true, missed: 0 });
  assert.deepEqual(client.cursor, { n1: [1, 9] });
  assert.deepEqual(events.find(([n]) => n === 'recovered')[1], { recovered: false, missed: 0 });
  assert.ok(events.some(([n]) => n === 'reset'));
  assert.deepEqual(s0.sent.slice(1), [
    { op: 'subscribe', id: 1, interests: [{ workspace: 'acme' }] },
    { op: 'subscribe', id: 2, interests: [{ workspace: 'secret' }] },
  ]);

  s0.push({ op: 'subscribed', id: 1 });
  s0.push({ op: 'error', id: 2, code: 'forbidden', message: 'no' });
  assert.deepEqual(client.interests, [{ workspace: 'acme' }]);
});
