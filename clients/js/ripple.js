// Ripple browser client: one ES module, no build step, no dependencies.
//
// What it guarantees (PROTOCOL.md, "Client sessions", is the server's side):
//
// - The app never sees the same position twice. Each change is checked
//   against the cursor (origin -> [epoch, seq]) before it is handed over;
//   a change at or before the cursor's entry for its origin, in the same
//   epoch, is dropped. A change in a different epoch is accepted, because the
//   origin restarted without its history and counts from 1 again.
// - The cursor moves forward only as changes arrive. It is taken from
//   `welcome.position` on the first session, and again after the node
//   answers a resume with `recovered: false` (then a "reset" event tells the
//   app to reload its state from its own source of truth).
// - Any close or error is followed by a reconnect to the next node in the
//   list (round robin), after an exponential backoff with full jitter, and a
//   resume from the cursor with every interest the app holds. This runs until
//   `close()` is called; there is no attempt limit.
//
// What it does not do yet:
//
// - In "json" format, numbers above 2^53 lose precision (JSON.parse). Epochs
//   are node start times in milliseconds, far below that; "msgpack" clients
//   would get any larger value as BigInt.
// - The node refuses a `subscribe` as a whole: when one interest is forbidden
//   or invalid, nothing of that request is subscribed. The client mirrors
//   this: a refused `subscribe` drops its interests from the client's set (the
//   "error" event lists them), so they do not poison later resumes. In a
//   resume the node refuses only the bad interests, listed in an error without
//   id before the welcome, and resumes the rest; the client drops the listed
//   ones.
// - Binary values inside a JSON `data` payload arrive as the server renders
//   them, `{"$binary": "<base64>"}` (and ext values as `{"$ext": {type,
//   data}}`), and are handed over untouched. In "msgpack" format they arrive
//   as Uint8Array and MsgpackExt.

/** Subprotocol names, by format. */
export const SUBPROTOCOLS = Object.freeze({
  json: 'ripple.v1.json',
  msgpack: 'ripple.v1.msgpack',
});

/** Close codes from PROTOCOL.md, plus the one this client uses itself. */
export const CLOSE_CODES = Object.freeze({
  NORMAL: 1000,
  TOO_BIG: 1009,
  UNAUTHORIZED: 4001,
  PROTOCOL_ERROR: 4002,
  TOO_SLOW: 4008,
  GOING_AWAY: 4009,
  /** Sent by this client when no welcome came in time. */
  NO_WELCOME: 4000,
});

/** Backoff defaults, in milliseconds. */
export const DEFAULT_BACKOFF = Object.freeze({ initialMs: 250, maxMs: 10000 });

/**
 * How long a new socket may take to open and be welcomed, in milliseconds,
 * before the client gives up on it and tries the next node. Browsers can
 * leave a socket in CONNECTING for minutes when a host drops packets.
 */
export const DEFAULT_WELCOME_TIMEOUT_MS = 10000;

// ---------------------------------------------------------------------------
// MessagePack
// ---------------------------------------------------------------------------

/** Deepest nesting the codec accepts; guards against cycles and hostile input. */
const MAX_DEPTH = 512;

const utf8Encoder = new TextEncoder();
const utf8Decoder = new TextDecoder('utf-8', { fatal: true });

/**
 * A MessagePack extension value. Ripple defines no extension types; they are
 * surfaced rather than refused so an unknown one does not break a session.
 */
export class MsgpackExt {
  /**
   * @param {number} type signed 8-bit extension type
   * @param {Uint8Array} data the raw payload
   */
  constructor(type, data) {
    this.type = type;
    this.data = data;
  }
}

/** A growable byte buffer; MessagePack lengths are only known as we go. */
class Writer {
  constructor() {
    this.bytes = new Uint8Array(256);
    this.view = new DataView(this.bytes.buffer);
    this.length = 0;
  }

  reserve(n) {
    const need = this.length + n;
    if (need <= this.bytes.length) return;
    let size = this.bytes.length * 2;
    while (size < need) size *= 2;
    const bytes = new Uint8Array(size);
    bytes.set(this.bytes.subarray(0, this.length));
    this.bytes = bytes;
    this.view = new DataView(bytes.buffer);
  }

  u8(v) {
    this.reserve(1);
    this.view.setUint8(this.length, v);
    this.length += 1;
  }

  /** A type byte followed by a big-endian field, as every MessagePack header is. */
  head(type, width, v, signed = false) {
    this.reserve(1 + width);
    const at = this.length + 1;
    this.view.setUint8(this.length, type);
    switch (width) {
      case 1:
        if (signed) this.view.setInt8(at, v);
        else this.view.setUint8(at, v);
        break;
      case 2:
        if (signed) this.view.setInt16(at, v);
        else this.view.setUint16(at, v);
        break;
      case 4:
        if (signed) this.view.setInt32(at, v);
        else this.view.setUint32(at, v);
        break;
      default:
        if (signed) this.view.setBigInt64(at, v);
        else this.view.setBigUint64(at, v);
    }
    this.length += 1 + width;
  }

  float64(v) {
    this.reserve(9);
    this.view.setUint8(this.length, 0xcb);
    this.view.setFloat64(this.length + 1, v);
    this.length += 9;
  }

  raw(bytes) {
    this.reserve(bytes.length);
    this.bytes.set(bytes, this.length);
    this.length += bytes.length;
  }

  result() {
    return this.bytes.slice(0, this.length);
  }
}

/** Writes a safe integer (Number) in the smallest form that holds it. */
function writeInt(w, n) {
  if (n >= 0) {
    if (n <= 0x7f) return w.u8(n);
    if (n <= 0xff) return w.head(0xcc, 1, n);
    if (n <= 0xffff) return w.head(0xcd, 2, n);
    if (n <= 0xffffffff) return w.head(0xce, 4, n);
    return w.head(0xcf, 8, BigInt(n));
  }
  if (n >= -32) return w.u8(n & 0xff);
  if (n >= -0x80) return w.head(0xd0, 1, n, true);
  if (n >= -0x8000) return w.head(0xd1, 2, n, true);
  if (n >= -0x80000000) return w.head(0xd2, 4, n, true);
  return w.head(0xd3, 8, BigInt(n), true);
}

function writeBigInt(w, n) {
  if (n >= BigInt(Number.MIN_SAFE_INTEGER) && n <= BigInt(Number.MAX_SAFE_INTEGER)) {
    return writeInt(w, Number(n));
  }
  if (n >= 0n && n <= 0xffffffffffffffffn) return w.head(0xcf, 8, n);
  if (n < 0n && n >= -0x8000000000000000n) return w.head(0xd3, 8, n, true);
  throw new RangeError(`msgpack: integer ${n} does not fit in 64 bits`);
}

/** Writes a length-prefixed header choosing among fix, 8-, 16- and 32-bit forms. */
function writeLength(w, len, fix, fixMax, t8, t16, t32) {
  if (fix !== null && len <= fixMax) return w.u8(fix | len);
  if (t8 !== null && len <= 0xff) return w.head(t8, 1, len);
  if (len <= 0xffff) return w.head(t16, 2, len);
  if (len <= 0xffffffff) return w.head(t32, 4, len);
  throw new RangeError(`msgpack: length ${len} is too large`);
}

function writeExt(w, ext) {
  const len = ext.data.length;
  const fixed = { 1: 0xd4, 2: 0xd5, 4: 0xd6, 8: 0xd7, 16: 0xd8 }[len];
  if (fixed !== undefined) {
    w.u8(fixed);
  } else {
    writeLength(w, len, null, 0, 0xc7, 0xc8, 0xc9);
  }
  w.reserve(1);
  w.view.setInt8(w.length, ext.type);
  w.length += 1;
  w.raw(ext.data);
}

function writeValue(w, value, depth) {
  if (depth > MAX_DEPTH) throw new RangeError('msgpack: value nested too deeply');

  if (value === null || value === undefined) return w.u8(0xc0);
  if (value === false) return w.u8(0xc2);
  if (value === true) return w.u8(0xc3);

  switch (typeof value) {
    case 'number':
      // -0 and unsafe integers go as floats so they come back unchanged.
      if (Number.isSafeInteger(value) && !Object.is(value, -0)) return writeInt(w, value);
      return w.float64(value);
    case 'bigint':
      return writeBigInt(w, value);
    case 'string': {
      const bytes = utf8Encoder.encode(value);
      writeLength(w, bytes.length, 0xa0, 31, 0xd9, 0xda, 0xdb);
      return w.raw(bytes);
    }
    case 'object':
      break;
    default:
      throw new TypeError(`msgpack: cannot encode a ${typeof value}`);
  }

  if (value instanceof MsgpackExt) return writeExt(w, value);

  if (value instanceof ArrayBuffer || ArrayBuffer.isView(value)) {
    const bytes = value instanceof ArrayBuffer
      ? new Uint8Array(value)
      : new Uint8Array(value.buffer, value.byteOffset, value.byteLength);
    writeLength(w, bytes.length, null, 0, 0xc4, 0xc5, 0xc6);
    return w.raw(bytes);
  }

  if (Array.isArray(value)) {
    writeLength(w, value.length, 0x90, 15, null, 0xdc, 0xdd);
    for (const item of value) writeValue(w, item, depth + 1);
    return;
  }

  if (value instanceof Map) {
    writeLength(w, value.size, 0x80, 15, null, 0xde, 0xdf);
    for (const [k, v] of value) {
      writeValue(w, k, depth + 1);
      writeValue(w, v, depth + 1);
    }
    return;
  }

  // Plain objects: like JSON.stringify, keys holding undefined are left out.
  const keys = Object.keys(value).filter((k) => value[k] !== undefined);
  writeLength(w, keys.length, 0x80, 15, null, 0xde, 0xdf);
  for (const k of keys) {
    writeValue(w, k, depth + 1);
    writeValue(w, value[k], depth + 1);
  }
}

/**
 * Encodes a value as MessagePack.
 *
 * null and undefined become nil; integral Numbers within 2^53 become the
 * smallest integer form, other Numbers float64; BigInt becomes a 64-bit
 * integer; Uint8Array, other typed arrays and ArrayBuffer become bin; Map and
 * plain objects become maps; MsgpackExt becomes ext.
 *
 * @param {unknown} value
 * @returns {Uint8Array}
 */
export function encodeMsgpack(value) {
  const w = new Writer();
  writeValue(w, value, 0);
  return w.result();
}

/** Reads MessagePack from a byte array, checking every length against the end. */
class Reader {
  constructor(bytes) {
    this.bytes = bytes;
    this.view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
    this.pos = 0;
  }

  need(n) {
    if (this.pos + n > this.bytes.length) throw new RangeError('msgpack: input is truncated');
    const at = this.pos;
    this.pos += n;
    return at;
  }

  u8() { return this.view.getUint8(this.need(1)); }
  u16() { return this.view.getUint16(this.need(2)); }
  u32() { return this.view.getUint32(this.need(4)); }

  bytesOf(n) {
    const at = this.need(n);
    // A copy, so a value the app keeps does not pin the whole frame.
    return this.bytes.slice(at, at + n);
  }

  str(n) {
    const at = this.need(n);
    return utf8Decoder.decode(this.bytes.subarray(at, at + n));
  }
}

/** Turns a 64-bit integer into a Number when that loses nothing. */
function fromBig(n) {
  const safe = n >= BigInt(Number.MIN_SAFE_INTEGER) && n <= BigInt(Number.MAX_SAFE_INTEGER);
  return safe ? Number(n) : n;
}

function readArray(r, len, depth) {
  const out = new Array(len);
  for (let i = 0; i < len; i++) out[i] = readValue(r, depth + 1);
  return out;
}

function readMap(r, len, depth) {
  const out = {};
  for (let i = 0; i < len; i++) {
    const key = readValue(r, depth + 1);
    const value = readValue(r, depth + 1);
    const name = typeof key === 'string' ? key : String(key);
    // Defined, not assigned: a "__proto__" key must not replace the prototype.
    Object.defineProperty(out, name, {
      value, enumerable: true, writable: true, configurable: true,
    });
  }
  return out;
}

function readExt(r, len) {
  const type = r.view.getInt8(r.need(1));
  return new MsgpackExt(type, r.bytesOf(len));
}

function readValue(r, depth) {
  if (depth > MAX_DEPTH) throw new RangeError('msgpack: value nested too deeply');
  const b = r.u8();

  if (b <= 0x7f) return b;
  if (b >= 0xe0) return b - 0x100;
  if (b >= 0x80 && b <= 0x8f) return readMap(r, b & 0x0f, depth);
  if (b >= 0x90 && b <= 0x9f) return readArray(r, b & 0x0f, depth);
  if (b >= 0xa0 && b <= 0xbf) return r.str(b & 0x1f);

  switch (b) {
    case 0xc0: return null;
    case 0xc2: return false;
    case 0xc3: return true;
    case 0xc4: return r.bytesOf(r.u8());
    case 0xc5: return r.bytesOf(r.u16());
    case 0xc6: return r.bytesOf(r.u32());
    case 0xc7: return readExt(r, r.u8());
    case 0xc8: return readExt(r, r.u16());
    case 0xc9: return readExt(r, r.u32());
    case 0xca: return r.view.getFloat32(r.need(4));
    case 0xcb: return r.view.getFloat64(r.need(8));
    case 0xcc: return r.u8();
    case 0xcd: return r.u16();
    case 0xce: return r.u32();
    case 0xcf: return fromBig(r.view.getBigUint64(r.need(8)));
    case 0xd0: return r.view.getInt8(r.need(1));
    case 0xd1: return r.view.getInt16(r.need(2));
    case 0xd2: return r.view.getInt32(r.need(4));
    case 0xd3: return fromBig(r.view.getBigInt64(r.need(8)));
    case 0xd4: return readExt(r, 1);
    case 0xd5: return readExt(r, 2);
    case 0xd6: return readExt(r, 4);
    case 0xd7: return readExt(r, 8);
    case 0xd8: return readExt(r, 16);
    case 0xd9: return r.str(r.u8());
    case 0xda: return r.str(r.u16());
    case 0xdb: return r.str(r.u32());
    case 0xdc: return readArray(r, r.u16(), depth);
    case 0xdd: return readArray(r, r.u32(), depth);
    case 0xde: return readMap(r, r.u16(), depth);
    case 0xdf: return readMap(r, r.u32(), depth);
    default: throw new RangeError(`msgpack: byte 0x${b.toString(16)} is not a valid type`);
  }
}

/**
 * Decodes exactly one MessagePack value.
 *
 * Integers come back as Number when they fit in 2^53, as BigInt otherwise;
 * bin as Uint8Array; maps as plain objects (non-string keys are turned into
 * strings); ext as MsgpackExt `{type, data}`. Truncated input, trailing bytes
 * and invalid UTF-8 throw.
 *
 * @param {Uint8Array | ArrayBuffer | ArrayBufferView} input
 * @returns {unknown}
 */
export function decodeMsgpack(input) {
  let bytes;
  if (input instanceof Uint8Array) bytes = input;
  else if (input instanceof ArrayBuffer) bytes = new Uint8Array(input);
  else if (ArrayBuffer.isView(input)) {
    bytes = new Uint8Array(input.buffer, input.byteOffset, input.byteLength);
  } else throw new TypeError('msgpack: input must be bytes');

  const r = new Reader(bytes);
  const value = readValue(r, 0);
  if (r.pos !== bytes.length) {
    throw new RangeError(`msgpack: ${bytes.length - r.pos} trailing bytes`);
  }
  return value;
}

// ---------------------------------------------------------------------------
// Cursor, positions, interests and backoff: pure helpers
// ---------------------------------------------------------------------------

function isCount(v) {
  return (typeof v === 'number' && Number.isInteger(v)) || typeof v === 'bigint';
}

/** True when `pos` has the `[origin, epoch, seq]` shape of a change position. */
export function isPosition(pos) {
  return Array.isArray(pos) && pos.length === 3 && typeof pos[0] === 'string'
    && isCount(pos[1]) && isCount(pos[2]);
}

/** Epochs may be Number or BigInt (msgpack above 2^53); compare by value. */
function sameEpoch(a, b) {
  // Loose equality compares a BigInt and a Number by their mathematical value.
  return a == b; // eslint-disable-line eqeqeq
}

/**
 * Builds a cursor (a Map from origin to [epoch, seq]) from the wire form, an
 * object such as `welcome.position`. Entries of the wrong shape are skipped:
 * a cursor with a bad entry would make every resume fail.
 *
 * @param {Record<string, [number|bigint, number|bigint]> | null | undefined} obj
 * @returns {Map<string, [number|bigint, number|bigint]>}
 */
export function cursorFromObject(obj) {
  const cursor = new Map();
  if (obj === null || typeof obj !== 'object') return cursor;
  for (const [origin, entry] of Object.entries(obj)) {
    if (Array.isArray(entry) && entry.length === 2 && isCount(entry[0]) && isCount(entry[1])) {
      cursor.set(origin, [entry[0], entry[1]]);
    }
  }
  return cursor;
}

/**
 * The wire form of a cursor: a fresh plain object, safe for the app to keep
 * or store (for instance to pass back as the `cursor` option next time).
 *
 * @param {Map<string, [number|bigint, number|bigint]>} cursor
 */
export function cursorToObject(cursor) {
  const out = {};
  for (const [origin, [epoch, seq]] of cursor) {
    Object.defineProperty(out, origin, {
      value: [epoch, seq], enumerable: true, writable: true, configurable: true,
    });
  }
  return out;
}

/**
 * Decides whether a change at `pos` is new to the app and, if it is, moves
 * the cursor's entry for its origin to it.
 *
 * A change is new when its origin has no entry yet, when its epoch differs
 * from the entry's (the origin restarted and counts from 1 again), or when its
 * seq is greater than the entry's. Anything else is a repeat, for instance
 * the overlap between a catch-up and changes already seen, and is dropped.
 *
 * @param {Map<string, [number|bigint, number|bigint]>} cursor mutated on accept
 * @param {[string, number|bigint, number|bigint]} pos
 * @returns {boolean} true when the change should be handed to the app
 */
export function acceptPosition(cursor, pos) {
  const [origin, epoch, seq] = pos;
  const entry = cursor.get(origin);
  if (entry && sameEpoch(entry[0], epoch) && !(seq > entry[1])) return false;
  cursor.set(origin, [epoch, seq]);
  return true;
}

/** Formats a position as `origin:epoch:seq`, the form the demo and logs use. */
export function formatPosition(pos) {
  return `${pos[0]}:${pos[1]}:${pos[2]}`;
}

/**
 * The frames that carry changes, flattened: both `change` and the batched
 * `changes` form. Any other message gives an empty array.
 *
 * @param {any} msg
 * @returns {any[]}
 */
export function changesOf(msg) {
  if (msg === null || typeof msg !== 'object') return [];
  if (msg.op === 'change') return [msg];
  if (msg.op === 'changes' && Array.isArray(msg.items)) return msg.items;
  return [];
}

/**
 * Checks an interest and returns it with only the keys the protocol knows,
 * so the same interest always has the same key and travels without extras.
 *
 * @param {{workspace: string, list?: string, record?: string}} interest
 */
export function normalizeInterest(interest) {
  if (interest === null || typeof interest !== 'object') {
    throw new TypeError('interest must be an object like {workspace: "acme"}');
  }
  const { workspace, list, record } = interest;
  if (typeof workspace !== 'string' || workspace === '') {
    throw new TypeError('interest.workspace must be a non-empty string');
  }
  const out = { workspace };
  for (const [name, value] of [['list', list], ['record', record]]) {
    if (value === undefined || value === null || value === '') continue;
    if (typeof value !== 'string') throw new TypeError(`interest.${name} must be a string`);
    out[name] = value;
  }
  // The node refuses such an interest; saying so here points at the caller.
  if (out.list !== undefined && out.record !== undefined) {
    throw new TypeError('an interest names a list or a record, not both');
  }
  return out;
}

/** A stable identity for an interest, used to keep the client's set free of repeats. */
export function interestKey(interest) {
  return JSON.stringify([interest.workspace, interest.list ?? null, interest.record ?? null]);
}

/** Largest exponent used; 2^30 times any sane initial delay is past any cap. */
const MAX_BACKOFF_EXPONENT = 30;

/**
 * The wait before reconnect number `attempt` (0 for the first after a
 * session ended): exponential growth with full jitter, so clients dropped
 * together by one node do not all come back in the same instant.
 *
 * delay = random(0, min(maxMs, initialMs * 2^attempt)), always in [0, maxMs].
 *
 * @param {number} attempt
 * @param {{initialMs?: number, maxMs?: number}} [backoff]
 * @param {() => number} [random] returns a number in [0, 1)
 * @returns {number} whole milliseconds
 */
export function backoffDelay(attempt, backoff = DEFAULT_BACKOFF, random = Math.random) {
  const initialMs = backoff.initialMs ?? DEFAULT_BACKOFF.initialMs;
  const maxMs = backoff.maxMs ?? DEFAULT_BACKOFF.maxMs;
  const exponent = Math.min(Math.max(0, attempt), MAX_BACKOFF_EXPONENT);
  const ceiling = Math.max(0, Math.min(maxMs, initialMs * 2 ** exponent));
  return Math.min(ceiling, Math.floor(random() * ceiling));
}

// ---------------------------------------------------------------------------
// The client
// ---------------------------------------------------------------------------

/**
 * Reports an exception thrown by an app's listener without letting it stop
 * the client: the session must keep running whatever a handler does.
 */
function reportListenerError(err) {
  if (typeof globalThis.reportError === 'function') globalThis.reportError(err);
  else setTimeout(() => { throw err; }, 0);
}

function errorMessage(err) {
  return err instanceof Error ? err.message : String(err);
}

/**
 * A session with a Ripple cluster that survives disconnects.
 *
 * Events, through `on(event, fn)` (returns a function that removes the
 * listener) and `off(event, fn)`; each listener gets one argument:
 *
 * - "change":    the change message, as sent (`pos`, `workspace`, `data`, ...)
 * - "state":     `{state, node, url, delayMs?}`; state is "connecting" (also
 *                while waiting to reconnect; `delayMs` says how long), "open"
 *                (welcomed) or "closed" (after `close()`)
 * - "welcome":   the welcome message
 * - "recovered": `{recovered, missed}` after every welcome that answered a
 *                resume
 * - "reset":     `{position, missed}` when a resume was not recovered: the
 *                cursor restarted from `position`, reload your state
 * - "error":     a server error `{op: "error", id, code, message}`, with
 *                `interests` added when it refused a request of this client
 *                (those interests are no longer held); or a client-side one
 *                with code "decode", "token" or "socket"
 * - "close":     `{code, reason}` each time a socket closes
 * - "subscribed", "unsubscribed": the server's answers, `{op, id}`
 */
export class RippleClient {
  #nodes;
  #token;
  #getToken;
  #format;
  #backoff;
  #welcomeTimeoutMs;
  #WebSocket;

  /** Every interest the app holds, by interestKey; sent whole in each resume. */
  #interests = new Map();
  /** Interests the current session has been given, by interestKey. */
  #sessionInterests = new Map();
  /** Requests of the current session not yet answered, by id. */
  #pending = new Map();
  /** Set when the node refused the interests of the current resume. */
  #resumeRefused = false;
  /** Map origin -> [epoch, seq]; null until a welcome or the `cursor` option. */
  #cursor = null;

  #ws = null;
  #state = 'closed';
  #nodeId = null;
  #nodeIndex = 0;
  #attempt = 0;
  #timer = null;
  #welcomeTimer = null;
  #welcomed = false;
  /** Whether the hello of the current socket carried a resume. */
  #resumed = false;
  /** Set after a 4001 close so the next connection asks getToken again. */
  #tokenStale = false;
  /** Bumped by close(): async work started before it must not act after it. */
  #generation = 0;
  #stopped = true;
  #nextId = 1;
  #listeners = new Map();

  /**
   * @param {object} options see ripple.d.ts for the full description
   */
  constructor(options = {}) {
    const {
      nodes, token, getToken, interests = [], format = 'json', backoff = {}, cursor,
      welcomeTimeoutMs = DEFAULT_WELCOME_TIMEOUT_MS, WebSocket: Socket = globalThis.WebSocket,
    } = options;

    if (!Array.isArray(nodes) || nodes.length === 0) {
      throw new TypeError('options.nodes must be a non-empty array of WebSocket URLs');
    }
    if (typeof token !== 'string' && typeof getToken !== 'function') {
      throw new TypeError('options.token (string) or options.getToken (function) is required');
    }
    if (!Object.hasOwn(SUBPROTOCOLS, format)) {
      throw new TypeError(`options.format must be "json" or "msgpack", not ${format}`);
    }
    if (typeof Socket !== 'function') {
      throw new TypeError('no WebSocket implementation: pass options.WebSocket');
    }

    this.#nodes = nodes.slice();
    this.#token = typeof token === 'string' ? token : null;
    this.#getToken = typeof getToken === 'function' ? getToken : null;
    this.#format = format;
    this.#backoff = {
      initialMs: backoff.initialMs ?? DEFAULT_BACKOFF.initialMs,
      maxMs: backoff.maxMs ?? DEFAULT_BACKOFF.maxMs,
    };
    this.#welcomeTimeoutMs = welcomeTimeoutMs;
    this.#WebSocket = Socket;
    if (cursor) this.#cursor = cursorFromObject(cursor);
    for (const interest of interests) this.#addInterest(normalizeInterest(interest));
  }

  /** A copy of the cursor in wire form, or null before the first welcome. */
  get cursor() {
    return this.#cursor ? cursorToObject(this.#cursor) : null;
  }

  /** The id of the node that welcomed the current session, or null. */
  get node() {
    return this.#nodeId;
  }

  /** "connecting", "open" or "closed". */
  get state() {
    return this.#state;
  }

  /** The interests the client holds, whether or not a session is open. */
  get interests() {
    return [...this.#interests.values()].map((i) => ({ ...i }));
  }

  /**
   * Starts the session (and keeps it alive until `close()`). Calling it while
   * already started does nothing. After a `close()`, it resumes from the
   * cursor the client kept.
   *
   * @returns {this}
   */
  connect() {
    if (!this.#stopped) return this;
    this.#stopped = false;
    this.#attempt = 0;
    this.#schedule(0);
    return this;
  }

  /** Ends the session and stops reconnecting. The cursor is kept. */
  close() {
    if (this.#stopped) return;
    this.#stopped = true;
    this.#generation += 1;
    clearTimeout(this.#timer);
    this.#timer = null;

    const ws = this.#ws;
    if (ws) {
      this.#forget(ws);
      try {
        ws.close(CLOSE_CODES.NORMAL, 'client closed');
      } catch {
        // Already closing; nothing more to release.
      }
      this.#emit('close', { code: CLOSE_CODES.NORMAL, reason: 'client closed' });
    }
    this.#nodeId = null;
    this.#setState('closed');
  }

  /**
   * Adds interests. Those the client already holds are skipped. When a
   * session is open they are sent at once and the request id is returned
   * (matched by a later "subscribed" or "error" event); otherwise they are
   * sent when the next session starts and null is returned.
   *
   * @param {object | object[]} interests one interest or an array of them
   * @returns {number | null}
   */
  subscribe(interests) {
    const fresh = [];
    for (const interest of [].concat(interests).map(normalizeInterest)) {
      if (this.#addInterest(interest)) fresh.push(interest);
    }
    if (!this.#welcomed || fresh.length === 0) return null;
    return this.#request('subscribe', fresh);
  }

  /**
   * Removes interests; the counterpart of `subscribe`, with the same return.
   *
   * @param {object | object[]} interests
   * @returns {number | null}
   */
  unsubscribe(interests) {
    const gone = [];
    for (const interest of [].concat(interests).map(normalizeInterest)) {
      if (this.#interests.delete(interestKey(interest))) gone.push(interest);
    }
    if (!this.#welcomed || gone.length === 0) return null;
    return this.#request('unsubscribe', gone);
  }

  /**
   * Adds a listener; returns a function that removes it.
   *
   * @param {string} event
   * @param {(detail: any) => void} fn
   */
  on(event, fn) {
    if (!this.#listeners.has(event)) this.#listeners.set(event, new Set());
    this.#listeners.get(event).add(fn);
    return () => this.off(event, fn);
  }

  /** Removes a listener added with `on`. */
  off(event, fn) {
    this.#listeners.get(event)?.delete(fn);
  }

  #emit(event, detail) {
    const set = this.#listeners.get(event);
    if (!set) return;
    for (const fn of [...set]) {
      try {
        fn(detail);
      } catch (err) {
        reportListenerError(err);
      }
    }
  }

  #setState(state, extra = {}) {
    this.#state = state;
    const url = this.#nodes[this.#nodeIndex];
    this.#emit('state', { state, node: this.#nodeId, url, ...extra });
  }

  #addInterest(interest) {
    const key = interestKey(interest);
    if (this.#interests.has(key)) return false;
    this.#interests.set(key, interest);
    return true;
  }

  #request(op, interests) {
    const id = this.#nextId++;
    for (const interest of interests) {
      const key = interestKey(interest);
      if (op === 'subscribe') this.#sessionInterests.set(key, interest);
      else this.#sessionInterests.delete(key);
    }
    this.#pending.set(id, { op, interests });
    this.#send({ op, id, interests });
    return id;
  }

  /** Waits `delayMs`, then opens a socket to the current node. */
  #schedule(delayMs) {
    this.#setState('connecting', { delayMs });
    clearTimeout(this.#timer);
    this.#timer = setTimeout(() => {
      this.#timer = null;
      this.#open();
    }, delayMs);
  }

  async #open() {
    const generation = this.#generation;
    const url = this.#nodes[this.#nodeIndex];

    let token;
    try {
      token = await this.#currentToken();
    } catch (err) {
      if (generation !== this.#generation) return;
      this.#emit('error', { op: 'error', code: 'token', message: errorMessage(err) });
      this.#retry();
      return;
    }
    if (generation !== this.#generation || this.#stopped) return;

    let ws;
    try {
      ws = new this.#WebSocket(url, [SUBPROTOCOLS[this.#format]]);
    } catch (err) {
      this.#emit('error', { op: 'error', code: 'socket', message: errorMessage(err) });
      this.#retry();
      return;
    }
    ws.binaryType = 'arraybuffer';
    this.#ws = ws;
    this.#welcomed = false;

    // One deadline covers both a socket stuck opening and a node that never
    // answers hello.
    this.#welcomeTimer = setTimeout(() => {
      if (ws !== this.#ws) return;
      try {
        ws.close(CLOSE_CODES.NO_WELCOME, 'no welcome in time');
      } catch {
        // Closing a socket still opening may throw in some runtimes.
      }
      this.#dropped(ws, CLOSE_CODES.NO_WELCOME, 'no welcome in time');
    }, this.#welcomeTimeoutMs);

    ws.onopen = () => {
      if (ws === this.#ws) this.#sendHello(token);
    };
    ws.onmessage = (ev) => {
      if (ws === this.#ws) this.#onFrame(ev.data);
    };
    // Browsers follow an error with a close whose code is always 1006, so
    // acting on the error first loses nothing and covers runtimes that don't.
    ws.onerror = () => {
      this.#dropped(ws, 1006, 'connection error');
      try {
        ws.close();
      } catch {
        // Nothing left to release.
      }
    };
    ws.onclose = (ev) => this.#dropped(ws, ev.code, ev.reason);
  }

  async #currentToken() {
    if (this.#getToken && (this.#token === null || this.#tokenStale)) {
      const token = await this.#getToken();
      if (typeof token !== 'string' || token === '') {
        throw new TypeError('getToken() must resolve to a non-empty string');
      }
      this.#token = token;
      this.#tokenStale = false;
    }
    return this.#token;
  }

  #sendHello(token) {
    const hello = { op: 'hello', token };

    // Resume whenever there is a cursor to resume from: after any earlier
    // welcome, or from the `cursor` option on the very first connection.
    this.#resumed = this.#cursor !== null;
    this.#resumeRefused = false;
    this.#pending = new Map();
    this.#sessionInterests = new Map();
    if (this.#resumed) {
      const interests = [...this.#interests.values()];
      hello.resume = { cursor: cursorToObject(this.#cursor), interests };
      this.#sessionInterests = new Map(this.#interests);
    }
    this.#send(hello);
  }

  /**
   * Sends in the format the server picked. Where it picked none, the
   * protocol's default, JSON, is what it speaks.
   */
  #send(msg) {
    const ws = this.#ws;
    if (!ws) return;
    if (ws.protocol === SUBPROTOCOLS.msgpack) ws.send(encodeMsgpack(msg));
    else ws.send(JSON.stringify(msg));
  }

  #onFrame(data) {
    let msg;
    try {
      msg = typeof data === 'string' ? JSON.parse(data) : decodeMsgpack(data);
    } catch (err) {
      // A frame we cannot read may have held a change. Reconnecting resumes
      // from the cursor, which has not moved past it, so nothing is lost.
      this.#emit('error', { op: 'error', code: 'decode', message: errorMessage(err) });
      const ws = this.#ws;
      try {
        ws.close(CLOSE_CODES.PROTOCOL_ERROR, 'undecodable frame');
      } catch {
        // Already closing.
      }
      this.#dropped(ws, CLOSE_CODES.PROTOCOL_ERROR, 'undecodable frame');
      return;
    }
    if (msg === null || typeof msg !== 'object') return;

    switch (msg.op) {
      case 'welcome':
        this.#onWelcome(msg);
        break;
      case 'change':
      case 'changes':
        for (const change of changesOf(msg)) this.#onChange(change);
        break;
      case 'subscribed':
      case 'unsubscribed':
        this.#pending.delete(msg.id);
        this.#emit(msg.op, msg);
        break;
      case 'error':
        this.#onError(msg);
        break;
      default:
        // Unknown ops are ignored so newer servers can add messages.
        break;
    }
  }

  #onWelcome(msg) {
    clearTimeout(this.#welcomeTimer);
    this.#welcomeTimer = null;
    this.#welcomed = true;
    this.#attempt = 0;
    this.#nodeId = typeof msg.node === 'string' ? msg.node : null;

    // The cursor is taken from the node only on a fresh start or when the
    // node could not recover ours. After a good resume it must not move: the
    // catch-up that follows may be cut short, and the next resume has to
    // start where the app really is. A refused resume subscribed nothing and
    // sent no catch-up, so changes were missed whatever `recovered` says.
    const recovered = msg.recovered !== false && !this.#resumeRefused;
    if (this.#resumeRefused) this.#sessionInterests = new Map();
    if (!this.#resumed || !recovered) this.#cursor = cursorFromObject(msg.position);

    this.#setState('open');
    this.#emit('welcome', msg);
    if (this.#resumed) {
      const missed = typeof msg.missed === 'number' ? msg.missed : 0;
      this.#emit('recovered', { recovered, missed });
      if (!recovered) this.#emit('reset', { position: this.cursor, missed });
    }

    // Interests added or removed while the hello was in flight are not in
    // what the node holds; send the difference now. One request per interest,
    // because the node refuses a request as a whole.
    const add = [...this.#interests].filter(([k]) => !this.#sessionInterests.has(k));
    const drop = [...this.#sessionInterests].filter(([k]) => !this.#interests.has(k));
    for (const [, interest] of add) this.#request('subscribe', [interest]);
    if (drop.length > 0) this.#request('unsubscribe', drop.map(([, interest]) => interest));
  }

  #onError(msg) {
    const hasId = msg.id !== undefined && msg.id !== null;
    const request = hasId ? this.#pending.get(msg.id) : undefined;
    if (request) {
      this.#pending.delete(msg.id);
      if (request.op === 'subscribe') {
        // Nothing of a refused request is subscribed; keeping its interests
        // would have every later resume refused too.
        for (const interest of request.interests) {
          const key = interestKey(interest);
          // Unless the app has since subscribed the same interest anew.
          if (this.#interests.get(key) === interest) this.#interests.delete(key);
          if (this.#sessionInterests.get(key) === interest) this.#sessionInterests.delete(key);
        }
      }
      this.#emit('error', { ...msg, interests: request.interests });
      return;
    }

    // Interests of a resume that the node refused come back in an error
    // without id, before the welcome, listing them; the node resumed the
    // others. They are dropped so that later resumes are not refused again.
    if (this.#resumed && !this.#welcomed) {
      if (Array.isArray(msg.interests)) {
        for (const refused of msg.interests) {
          const key = interestKey(refused);
          this.#interests.delete(key);
          this.#sessionInterests.delete(key);
        }
      } else {
        // A node that does not say which: assume it resumed none of them.
        this.#resumeRefused = true;
      }
    }
    this.#emit('error', msg);
  }

  #onChange(change) {
    if (change === null || typeof change !== 'object' || !isPosition(change.pos)) {
      this.#emit('error', { op: 'error', code: 'decode', message: 'change without a valid pos' });
      return;
    }
    if (this.#cursor === null) this.#cursor = new Map();
    if (acceptPosition(this.#cursor, change.pos)) this.#emit('change', change);
  }

  /** Detaches the handlers of a socket we are done with. */
  #forget(ws) {
    ws.onopen = ws.onmessage = ws.onerror = ws.onclose = null;
    if (ws === this.#ws) this.#ws = null;
    clearTimeout(this.#welcomeTimer);
    this.#welcomeTimer = null;
    this.#welcomed = false;
  }

  /** Handles the end of a socket, however it ended; acts once per socket. */
  #dropped(ws, code, reason) {
    if (!ws || ws !== this.#ws) return;
    this.#forget(ws);
    this.#nodeId = null;
    this.#emit('close', { code, reason });
    if (code === CLOSE_CODES.UNAUTHORIZED) this.#tokenStale = true;
    if (this.#stopped) {
      this.#setState('closed');
      return;
    }
    this.#retry();
  }

  /** Moves to the next node and waits out the backoff before trying it. */
  #retry() {
    if (this.#stopped) return;
    this.#nodeIndex = (this.#nodeIndex + 1) % this.#nodes.length;
    const delayMs = backoffDelay(this.#attempt, this.#backoff);
    this.#attempt += 1;
    this.#schedule(delayMs);
  }
}
