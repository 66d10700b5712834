// Type declarations for ripple.js, the Ripple browser client.
// The wire shapes follow PROTOCOL.md, version 1.

/** Epochs and seqs are Numbers; in msgpack format, values above 2^53 are BigInt. */
export type Count = number | bigint;

/** `[origin, epoch, seq]`: where a change sits in its origin's sequence. */
export type Position = [origin: string, epoch: Count, seq: Count];

/** The last position seen from each origin: `{"n1": [17, 1042]}`. */
export type Cursor = Record<string, [epoch: Count, seq: Count]>;

/**
 * What a session receives: a whole workspace, one list in it, or one record
 * (a list or a record, never both).
 */
export interface Interest {
  workspace: string;
  list?: string;
  record?: string;
}

/**
 * A change as the server sends it. In JSON format, binary values inside
 * `data` arrive as `{"$binary": "<base64>"}` and ext values as
 * `{"$ext": {"type": n, "data": "<base64>"}}`, left as they are; in msgpack
 * format they arrive as Uint8Array and MsgpackExt.
 */
export interface Change {
  op: 'change';
  pos: Position;
  /** Milliseconds since the Unix epoch, set by the origin. */
  ts: number;
  workspace: string;
  record?: string;
  lists?: string[];
  kind?: string;
  data?: unknown;
}

export interface Welcome {
  op: 'welcome';
  node: string;
  session: string;
  position: Cursor;
  recovered: boolean;
  missed: number;
}

/**
 * A server error ("forbidden", "invalid", "too_many_interests"; no id when it
 * is about the resume of a hello), or one raised by the client itself with
 * code "decode" (an unreadable frame), "token" (getToken failed) or "socket"
 * (the WebSocket could not be created).
 */
export interface ErrorMessage {
  op: 'error';
  id?: number;
  code: string;
  message: string;
  /** When the node refused a request of this client: its interests, now dropped. */
  interests?: Interest[];
}

export type State = 'connecting' | 'open' | 'closed';

export interface StateEvent {
  state: State;
  /** The welcoming node's id once open, otherwise null. */
  node: string | null;
  /** The URL in use, or the one about to be tried. */
  url: string;
  /** With "connecting": how long the client waits before trying `url`. */
  delayMs?: number;
}

export interface RecoveredEvent {
  recovered: boolean;
  missed: number;
}

/** After `recovered: false`: the cursor restarted here; reload app state. */
export interface ResetEvent {
  position: Cursor;
  missed: number;
}

export interface CloseEvent {
  code: number;
  reason: string;
}

export interface AckMessage {
  op: 'subscribed' | 'unsubscribed';
  id: number;
}

export interface RippleEvents {
  change: Change;
  state: StateEvent;
  welcome: Welcome;
  recovered: RecoveredEvent;
  reset: ResetEvent;
  error: ErrorMessage;
  close: CloseEvent;
  subscribed: AckMessage;
  unsubscribed: AckMessage;
}

export interface Backoff {
  /** First reconnect waits up to this long. Default 250. */
  initialMs?: number;
  /** No reconnect waits longer. Default 10000. */
  maxMs?: number;
}

export interface RippleClientOptions {
  /** WebSocket URLs such as "ws://127.0.0.1:8080/v1/ws", tried in turn. */
  nodes: string[];
  /** A JWT; one of `token` and `getToken` is required. */
  token?: string;
  /** Called for the first connection and again after a 4001 close. */
  getToken?: () => Promise<string> | string;
  interests?: Interest[];
  /** Default "json". */
  format?: 'json' | 'msgpack';
  backoff?: Backoff;
  /** A cursor kept from an earlier session: the first connection resumes it. */
  cursor?: Cursor;
  /** A socket not welcomed within this long is given up. Default 10000. */
  welcomeTimeoutMs?: number;
  /** A WebSocket constructor, for runtimes without a global one. */
  WebSocket?: new (url: string, protocols: string[]) => WebSocket;
}

export declare class RippleClient {
  constructor(options: RippleClientOptions);

  /** A copy of the cursor, or null before the first welcome. */
  readonly cursor: Cursor | null;
  /** The id of the node that welcomed the current session, or null. */
  readonly node: string | null;
  readonly state: State;
  /** The interests held, sent whole in each resume. */
  readonly interests: Interest[];

  /** Starts the session; it reconnects until `close()`. */
  connect(): this;
  /** Ends the session and stops reconnecting; the cursor is kept. */
  close(): void;
  /** Returns the request id when sent now, null when held for the next session. */
  subscribe(interests: Interest | Interest[]): number | null;
  unsubscribe(interests: Interest | Interest[]): number | null;

  /** Adds a listener; the returned function removes it. */
  on<K extends keyof RippleEvents>(event: K, fn: (detail: RippleEvents[K]) => void): () => void;
  off<K extends keyof RippleEvents>(event: K, fn: (detail: RippleEvents[K]) => void): void;
}

export declare class MsgpackExt {
  constructor(type: number, data: Uint8Array);
  type: number;
  data: Uint8Array;
}

export declare const SUBPROTOCOLS: Readonly<{ json: string; msgpack: string }>;
export declare const CLOSE_CODES: Readonly<{
  NORMAL: 1000;
  TOO_BIG: 1009;
  UNAUTHORIZED: 4001;
  PROTOCOL_ERROR: 4002;
  TOO_SLOW: 4008;
  GOING_AWAY: 4009;
  NO_WELCOME: 4000;
}>;
export declare const DEFAULT_BACKOFF: Readonly<Required<Backoff>>;
export declare const DEFAULT_WELCOME_TIMEOUT_MS: number;

export declare function encodeMsgpack(value: unknown): Uint8Array;
export declare function decodeMsgpack(input: Uint8Array | ArrayBuffer | ArrayBufferView): unknown;

export declare function isPosition(pos: unknown): pos is Position;
export declare function formatPosition(pos: Position): string;
export declare function cursorFromObject(
  obj: Cursor | null | undefined,
): Map<string, [Count, Count]>;
export declare function cursorToObject(cursor: Map<string, [Count, Count]>): Cursor;
/** True when the change is new; then the cursor's entry moves to it. */
export declare function acceptPosition(
  cursor: Map<string, [Count, Count]>,
  pos: Position,
): boolean;
export declare function changesOf(msg: unknown): Change[];
export declare function normalizeInterest(interest: Interest): Interest;
export declare function interestKey(interest: Interest): string;
/** A delay in [0, min(maxMs, initialMs * 2^attempt)], in whole milliseconds. */
export declare function backoffDelay(
  attempt: number,
  backoff?: Backoff,
  random?: () => number,
): number;
