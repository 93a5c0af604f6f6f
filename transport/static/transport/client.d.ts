// Type declarations of client.js, the browser client of the wire protocol.

export type TransportName = "ws" | "poll";

export type ConnectionState = "idle" | "connecting" | "open" | "offline" | "closed";

/** The part of the Web Storage API the client uses. */
export interface StorageLike {
  getItem(key: string): string | null;
  setItem(key: string, value: string): void;
  removeItem(key: string): void;
}

export interface TransportClientOptions {
  /** Origin of the server, e.g. "https://example.com"; defaults to the page's. */
  url?: string;
  /** WebSocket URL, or a function asked before each attempt; defaults from `url`. */
  wsUrl?: string | (() => string);
  /** Transports allowed, in order of preference. Default ["ws", "poll"]. */
  transports?: TransportName[];
  /** Where the token and last seq are kept. Default sessionStorage. */
  storage?: StorageLike;
  /** Key of the client's entry in `storage`. Default "transport". */
  storageKey?: string;
  /** ms a WebSocket has to be welcomed before long-polling is used. Default 3000. */
  connectTimeout?: number;
  /** WebSockets closing within `stableAfter` in a row before falling back. Default 3. */
  wsFailuresBeforeFallback?: number;
  /** ms a WebSocket must live to count as working. Default 10000. */
  stableAfter?: number;
  /** ms between WebSocket probes while long-polling, doubled per failure. Default 15000. */
  wsRetryDelay?: number;
  /** Longest delay between WebSocket probes. Default 120000. */
  wsRetryDelayMax?: number;
  /** Seconds one long-poll may wait on the server. Default 25. */
  pollTimeout?: number;
  /** ms before action() rejects with code "timeout". Default 30000. */
  actionTimeout?: number;
  /** First reconnect delay in ms; doubles per failure, with jitter. Default 500. */
  backoffInitial?: number;
  /** Longest reconnect delay in ms. Default 30000. */
  backoffMax?: number;
  /** ms of WebSocket silence before the client pings; 0 disables. Default 25000. */
  pingInterval?: number;
  /** ms a ping may go unanswered before the WebSocket is dropped. Default 10000. */
  pongTimeout?: number;
  /**
   * W3C trace context sent with every action: a value or a function giving
   * one. Defaults to <meta name="traceparent" content="…"> when the page has it.
   */
  traceparent?: string | (() => string | undefined);
}

export interface ActionOptions {
  /** Idempotency key; a fresh one by default. Reuse it only for the same action. */
  id?: string | number;
  /** ms before the promise rejects with code "timeout". */
  timeout?: number;
  /** Trace context of this action, over the client's option. */
  traceparent?: string;
}

/** A mailbox message as handed to the page, once, in seq order. */
export interface TransportMessage<P = unknown> {
  seq: number;
  message_type: string;
  payload: P;
  sent_at: string;
}

export interface TransportEventMap {
  message: TransportMessage;
  /** The server dropped messages after `after` before the client had them. */
  gap: { transport: TransportName; after: number };
  state: { state: ConnectionState; previous: ConnectionState };
  connecting: { previous: ConnectionState };
  offline: { previous: ConnectionState };
  open: { transport: TransportName; sessionId: string; resumed: boolean };
  transport: { transport: TransportName | null; previous: TransportName | null };
  /** A new session began (first contact, or the old one was refused). */
  session: { sessionId: string; previous: string | null };
  error: { error: Error; transport?: TransportName };
}

/** An error of the protocol (code and message), or "timeout" / "closed". */
export declare class TransportError extends Error {
  constructor(code: string, message?: string, details?: Record<string, unknown>);
  code: string;
  id?: string | number;
}

export declare class TransportClient extends EventTarget {
  constructor(options?: TransportClientOptions);

  readonly options: TransportClientOptions;
  readonly state: ConnectionState;
  readonly transport: TransportName | null;
  readonly sessionId: string | null;
  readonly token: string | null;
  /** The last seq handed to the page (or known gone); acknowledged to the server. */
  readonly lastSeq: number;
  /** Messages received again and dropped by seq. */
  readonly duplicates: number;

  /** Connect, and keep connected until close(). */
  start(): this;
  /** Disconnect; pending actions reject with code "closed". */
  close(): void;
  /** Run an action; resolve with the reply payload or reject with a TransportError. */
  action<R = unknown>(
    name: string,
    payload?: Record<string, unknown>,
    options?: ActionOptions,
  ): Promise<R>;
  /** Subscribe to an event's detail; returns the unsubscribe function. */
  on<K extends keyof TransportEventMap>(
    type: K,
    handler: (detail: TransportEventMap[K]) => void,
  ): () => void;

  addEventListener<K extends keyof TransportEventMap>(
    type: K,
    listener: (event: CustomEvent<TransportEventMap[K]>) => void,
    options?: boolean | AddEventListenerOptions,
  ): void;
  addEventListener(
    type: string,
    listener: EventListenerOrEventListenerObject | null,
    options?: boolean | AddEventListenerOptions,
  ): void;
  removeEventListener<K extends keyof TransportEventMap>(
    type: K,
    listener: (event: CustomEvent<TransportEventMap[K]>) => void,
    options?: boolean | EventListenerOptions,
  ): void;
  removeEventListener(
    type: string,
    listener: EventListenerOrEventListenerObject | null,
    options?: boolean | EventListenerOptions,
  ): void;
}

/** Delay in ms before retry number `attempt`: capped exponential with jitter. */
export declare function backoffDelay(attempt: number, initial: number, max: number): number;
