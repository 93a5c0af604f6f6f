// Browser client of the transport's wire protocol, version 1.
//
//   import { TransportClient } from "/static/transport/client.js";
//   const client = new TransportClient();
//   client.addEventListener("message", (e) => console.log(e.detail.payload));
//   client.start();
//   const reply = await client.action("echo", { hi: "there" });
//
// WebSocket first; long-polling when the WebSocket cannot open within
// `connectTimeout` or keeps dropping, with a WebSocket probe every
// `wsRetryDelay` that switches back as soon as one is welcomed. Both
// transports resume from the last seq handed to the page, so a switch,
// a reconnect or a reload neither loses nor repeats a message.
//
// No dependencies, no build step: an ES module for current browsers.

const STORAGE_VERSION = 1;

// Close codes of the protocol that change what the client does next.
const CLOSE_BAD_TOKEN = 4401;
const CLOSE_RATE_LIMITED = 4429;

// Acks count against the server's per-client frame rate limit (50/s by
// default), so one per message would get a burst's connection closed with
// 4429. The client acks at most every ACK_DELAY ms, and at once when
// ACK_EVERY messages wait, well inside the server's push window (100), so
// flow control never stalls on the timer.
const ACK_DELAY = 100;
const ACK_EVERY = 32;

const DEFAULTS = {
  url: undefined,
  wsUrl: undefined,
  transports: ["ws", "poll"],
  storage: undefined,
  storageKey: "transport",
  // A WebSocket that is not welcomed this soon counts as blocked; three
  // seconds covers a slow handshake on a phone and still falls back
  // before a person gives up on the page.
  connectTimeout: 3000,
  // A WebSocket that closes within `stableAfter` of its welcome this many
  // times in a row keeps failing (a proxy that cuts it): use long-polling.
  wsFailuresBeforeFallback: 3,
  stableAfter: 10000,
  wsRetryDelay: 15000,
  wsRetryDelayMax: 120000,
  // Under the server's 25 s default and every common proxy's idle timeout.
  pollTimeout: 25,
  actionTimeout: 30000,
  backoffInitial: 500,
  backoffMax: 30000,
  // The server pings too, but a browser cannot see those: the client's own
  // ping finds a dead connection behind a NAT that dropped it silently.
  pingInterval: 25000,
  pongTimeout: 10000,
  traceparent: undefined,
};

/** An error of the protocol (`code`, `message`), or of the client itself. */
export class TransportError extends Error {
  constructor(code, message, details = {}) {
    super(message || code);
    this.name = "TransportError";
    this.code = code;
    Object.assign(this, details);
  }
}

/** Return a delay for the n-th retry: capped exponential, with jitter. */
export function backoffDelay(attempt, initial, max) {
  const ceiling = Math.min(max, initial * 2 ** Math.max(0, attempt - 1));
  // "Equal jitter": at least half the ceiling, so retries never bunch at 0,
  // and spread over the other half, so clients restarted together do not
  // come back together.
  return ceiling / 2 + Math.random() * (ceiling / 2);
}

function newId() {
  if (globalThis.crypto && typeof globalThis.crypto.randomUUID === "function") {
    return "a_" + globalThis.crypto.randomUUID();
  }
  return "a_" + Date.now().toString(36) + Math.random().toString(36).slice(2, 12);
}

function defaultStorage() {
  try {
    return globalThis.sessionStorage || memoryStorage();
  } catch {
    // Storage access throws in sandboxed frames and some private modes.
    return memoryStorage();
  }
}

function memoryStorage() {
  const items = new Map();
  return {
    getItem: (key) => (items.has(key) ? items.get(key) : null),
    setItem: (key, value) => items.set(key, String(value)),
    removeItem: (key) => items.delete(key),
  };
}

function metaTraceparent() {
  const meta = globalThis.document && document.querySelector('meta[name="traceparent"]');
  return meta ? meta.content : undefined;
}

/** One WebSocket: its socket, when it was welcomed, and what it acknowledged. */
class Connection {
  constructor(sock) {
    this.sock = sock;
    this.welcomedAt = 0;
    this.acked = 0;
    this.ackTimer = null;
    this.lastFrameAt = Date.now();
    this.heartbeat = null;
    this.closed = null;
  }

  send(frame) {
    if (this.sock.readyState !== WebSocket.OPEN) return false;
    this.sock.send(JSON.stringify(frame));
    return true;
  }
}

export class TransportClient extends EventTarget {
  constructor(options = {}) {
    super();
    this.options = { ...DEFAULTS, ...options };
    const base = this.options.url || globalThis.location.origin;
    this._base = base.replace(/\/+$/, "");
    this._storage = this.options.storage || defaultStorage();

    this.state = "idle";
    this.transport = null;
    this.sessionId = null;
    this.token = null;
    this.lastSeq = 0;
    this.duplicates = 0;

    this._stopped = true;
    this._generation = 0;
    this._ws = null;
    this._poll = null;
    this._pending = new Map();
    this._wsBlockedUntil = 0;
    this._wsRetryDelay = this.options.wsRetryDelay;
    this._wsStrikes = 0;
    this._wake = null;
    this._onOnline = () => this._wakeUp();
    this._load();
  }

  // --- public API ----------------------------------------------------------

  /** Connect, and keep connected until close(). Returns the client. */
  start() {
    if (!this._stopped) return this;
    this._stopped = false;
    this._generation += 1;
    globalThis.addEventListener?.("online", this._onOnline);
    this._run(this._generation).catch((err) => this._emit("error", { error: err }));
    return this;
  }

  /** Disconnect for good; pending actions fail with code `closed`. */
  close() {
    if (this._stopped) return;
    this._stopped = true;
    this._generation += 1;
    globalThis.removeEventListener?.("online", this._onOnline);
    this._wakeUp();
    if (this._poll) this._poll.abort.abort();
    if (this._ws) this._ws.sock.close(1000, "client closed");
    for (const pending of this._pending.values()) {
      this._settle(pending, null, new TransportError("closed", "the client was closed"));
    }
    this._setTransport(null);
    this._setState("closed");
  }

  /**
   * Run an action on the server; resolve with its reply payload.
   *
   * The action keeps one id across retries, so it runs once however often
   * a reconnect makes the client send it again. Rejects with a
   * TransportError: the reply's error, `timeout` after `timeout` ms, or
   * `closed`.
   */
  action(name, payload = {}, options = {}) {
    const traceparent = this._traceparent(options.traceparent);
    const pending = {
      id: options.id ?? newId(),
      name,
      payload,
      traceparent,
      via: null,
      timer: null,
      attempts: 0,
    };
    const promise = new Promise((resolve, reject) => {
      pending.resolve = resolve;
      pending.reject = reject;
    });
    const timeout = options.timeout ?? this.options.actionTimeout;
    pending.timer = setTimeout(() => {
      const message = `no reply to ${name} within ${timeout} ms`;
      this._settle(pending, null, new TransportError("timeout", message, { id: pending.id }));
    }, timeout);
    this._pending.set(String(pending.id), pending);
    if (this._stopped && this.state === "closed") {
      this._settle(pending, null, new TransportError("closed", "the client was closed"));
    } else {
      this._send(pending);
    }
    return promise;
  }

  /** Subscribe to an event's detail; return a function that unsubscribes. */
  on(type, handler) {
    const listener = (event) => handler(event.detail);
    this.addEventListener(type, listener);
    return () => this.removeEventListener(type, listener);
  }

  // --- the connection loop -------------------------------------------------

  /**
   * Keep one transport open until close().
   *
   * 1. Try the WebSocket, unless it recently failed while REST worked.
   * 2. When it does not open, or keeps dropping, long-poll; the poll loop
   *    probes the WebSocket now and then and hands back a welcomed one.
   * 3. When neither answers, the client is offline: wait with backoff.
   */
  async _run(generation) {
    const alive = () => generation === this._generation;
    let offlineRounds = 0;
    let handed = null;
    while (alive()) {
      if (handed || this._wsAllowed()) {
        let conn = handed;
        handed = null;
        if (!conn) {
          this._setState("connecting");
          try {
            conn = await this._openWs(generation);
          } catch (err) {
            if (await this._afterRefusal(err)) continue;
          }
        }
        if (conn) {
          offlineRounds = 0;
          const end = await conn.closed;
          if (!alive()) break;
          if (await this._afterRefusal(end)) continue;
          const brief = end.lived < this.options.stableAfter;
          this._wsStrikes = brief ? this._wsStrikes + 1 : 0;
          if (this._wsStrikes < this.options.wsFailuresBeforeFallback) {
            this._setState("connecting");
            await this._sleep(this._backoff(this._wsStrikes));
            continue;
          }
        }
        this._blockWs();
      }

      const outcome = await this._pollLoop(generation);
      if (outcome.conn) {
        handed = outcome.conn;
        offlineRounds = 0;
        continue;
      }
      if (!alive()) break;
      // Nothing answered at all: the WebSocket is not to blame, so the next
      // round tries it first again.
      if (!outcome.served) this._wsBlockedUntil = 0;
      offlineRounds += 1;
      this._setTransport(null);
      this._setState("offline");
      await this._sleep(outcome.retryAfter ?? this._backoff(offlineRounds));
    }
  }

  /** Handle a refused token or a rate limit; return true to retry at once. */
  async _afterRefusal(end) {
    if (!end) return false;
    if (end.code === CLOSE_BAD_TOKEN) {
      this._forgetSession("token refused");
      return true;
    }
    if (end.code === CLOSE_RATE_LIMITED) {
      const seconds = Number.parseFloat(end.reason) || 1;
      this._setState("offline");
      await this._sleep(seconds * 1000);
      return true;
    }
    return false;
  }

  _wsAllowed() {
    return (
      this.options.transports.includes("ws") &&
      typeof WebSocket !== "undefined" &&
      Date.now() >= this._wsBlockedUntil
    );
  }

  _blockWs() {
    if (!this.options.transports.includes("poll")) {
      // Nothing to fall back to: retry the WebSocket after a backoff.
      this._wsBlockedUntil = Date.now() + this._backoff(this._wsStrikes + 1);
      return;
    }
    this._wsBlockedUntil = Date.now() + this._wsRetryDelay;
  }

  _backoff(attempt) {
    return backoffDelay(attempt, this.options.backoffInitial, this.options.backoffMax);
  }

  _sleep(ms) {
    return new Promise((resolve) => {
      const timer = setTimeout(done, ms);
      function done() {
        clearTimeout(timer);
        resolve();
      }
      this._wake = done;
    }).finally(() => {
      this._wake = null;
    });
  }

  _wakeUp() {
    if (this._wake) this._wake();
  }

  // --- WebSocket -------------------------------------------------------------

  _wsUrl() {
    const configured = this.options.wsUrl;
    const url = typeof configured === "function" ? configured() : configured;
    if (url) return url;
    return this._base.replace(/^http/, "ws") + "/ws/transport/";
  }

  /**
   * Open a WebSocket and say hello; resolve with the welcomed Connection.
   *
   * Rejects when it closes or `connectTimeout` passes before `welcome`.
   * The welcomed connection's `closed` promise resolves when it ends.
   */
  _openWs(generation) {
    return new Promise((resolve, reject) => {
      let sock;
      try {
        sock = new WebSocket(this._wsUrl());
      } catch (err) {
        reject(new TransportError("ws_unavailable", String(err)));
        return;
      }
      const conn = new Connection(sock);
      let ended;
      conn.closed = new Promise((r) => {
        ended = r;
      });
      let timedOut = false;
      const timer = setTimeout(() => {
        timedOut = true;
        reject(new TransportError("ws_timeout", "the WebSocket did not open in time"));
        sock.close();
      }, this.options.connectTimeout);

      sock.onopen = () => {
        const hello = { type: "hello" };
        if (this.token) {
          hello.token = this.token;
          hello.after = this.lastSeq;
          conn.acked = this.lastSeq;
        }
        conn.send(hello);
      };
      sock.onmessage = (event) => {
        conn.lastFrameAt = Date.now();
        let frame;
        try {
          frame = JSON.parse(event.data);
        } catch {
          return;
        }
        if (!conn.welcomedAt) {
          if (frame.type !== "welcome" || timedOut) return;
          clearTimeout(timer);
          if (generation !== this._generation) {
            // close() came while this socket was opening.
            reject(new TransportError("closed", "the client was closed"));
            sock.close(1000, "client closed");
            return;
          }
          conn.welcomedAt = Date.now();
          this._welcomed(conn, frame);
          resolve(conn);
          return;
        }
        this._onFrame(conn, frame);
      };
      sock.onclose = (event) => {
        clearTimeout(timer);
        const end = { code: event.code, reason: event.reason };
        if (!conn.welcomedAt) {
          reject(new TransportError("ws_closed", `closed with ${event.code}`, end));
          return;
        }
        this._wsEnded(conn);
        ended({ ...end, lived: Date.now() - conn.welcomedAt });
      };
    });
  }

  _welcomed(conn, welcome) {
    if (!welcome.resumed) {
      this._newSession(welcome.session_id);
    }
    this.sessionId = welcome.session_id;
    this.token = welcome.token;
    this._save();

    if (this._poll) this._poll.abort.abort();
    this._ws = conn;
    this._wsRetryDelay = this.options.wsRetryDelay;
    this._startHeartbeat(conn);
    this._setTransport("ws");
    this._setState("open");
    this._emit("open", { transport: "ws", sessionId: this.sessionId, resumed: welcome.resumed });
    if (welcome.gap) this._emit("gap", { transport: "ws", after: this.lastSeq });
    this._flushActions();
  }

  _onFrame(conn, frame) {
    switch (frame.type) {
      case "message":
        this._receive(frame);
        this._queueAck(conn);
        break;
      case "reply":
        this._onReply(frame, conn);
        break;
      case "pong":
        break;
      case "error":
        this._emit("error", {
          error: new TransportError(frame.code, frame.message),
          transport: "ws",
        });
        break;
      default:
        break;
    }
  }

  /** Acknowledge what the page has had, a burst of messages at a time. */
  _queueAck(conn) {
    if (this.lastSeq - conn.acked >= ACK_EVERY) {
      this._ack(conn);
    } else if (conn.ackTimer === null) {
      conn.ackTimer = setTimeout(() => this._ack(conn), ACK_DELAY);
    }
  }

  _ack(conn) {
    clearTimeout(conn.ackTimer);
    conn.ackTimer = null;
    if (this.lastSeq > conn.acked && conn.send({ type: "ack", seq: this.lastSeq })) {
      conn.acked = this.lastSeq;
    }
  }

  _startHeartbeat(conn) {
    const { pingInterval, pongTimeout } = this.options;
    if (!pingInterval) return;
    conn.heartbeat = setInterval(() => {
      const silent = Date.now() - conn.lastFrameAt;
      if (silent > pingInterval + pongTimeout) {
        // Half-open: the browser would wait for TCP to give up, for minutes.
        conn.sock.close(4000, "no pong");
      } else if (silent >= pingInterval) {
        conn.send({ type: "ping" });
      }
    }, Math.min(pingInterval, pongTimeout));
  }

  _wsEnded(conn) {
    clearInterval(conn.heartbeat);
    clearTimeout(conn.ackTimer);
    if (this._ws === conn) {
      this._ws = null;
      this._setTransport(null);
    }
    for (const pending of this._pending.values()) {
      if (pending.via === conn) pending.via = null;
    }
  }

  // --- long-poll -------------------------------------------------------------

  /**
   * Long-poll until a request fails, close(), or a WebSocket probe succeeds.
   *
   * Resolves with `{served, conn, retryAfter}`: `conn` is a welcomed
   * WebSocket to use instead; `served` tells whether any poll was answered.
   */
  async _pollLoop(generation) {
    if (!this.options.transports.includes("poll")) return { served: false };
    const poll = { abort: new AbortController(), conn: null };
    this._poll = poll;
    const probing = this._probeWs(poll, generation);
    let served = false;
    let created = false;
    let early = 0;
    let retryAfter;
    this._setState("connecting");
    try {
      while (generation === this._generation && !poll.abort.signal.aborted) {
        if (!this.token) {
          await this._createSession(poll.abort.signal);
          created = true;
        }
        // The first poll answers at once: the page learns it is connected
        // now, not when the first message or the poll timeout comes.
        const timeout = served ? this.options.pollTimeout : 0;
        const path = `/transport/poll?after=${this.lastSeq}&timeout=${timeout}`;
        const asked = Date.now();
        const response = await this._http("GET", path, undefined, poll.abort.signal);
        if (response.status === 401 || response.status === 404) {
          this._forgetSession("token refused");
          continue;
        }
        if (response.status === 429) {
          retryAfter = (Number.parseFloat(response.headers.get("Retry-After")) || 1) * 1000;
          break;
        }
        if (!response.ok) break;
        const body = await response.json();
        if (!served) {
          served = true;
          if (!this._ws) {
            this._setTransport("poll");
            this._setState("open");
            const resumed = !created;
            this._emit("open", { transport: "poll", sessionId: this.sessionId, resumed });
            this._flushActions();
          }
        }
        this._onBatch(body, "poll");

        // An empty answer long before the timeout means another poll of
        // this session took over (a second tab sharing its storage): back
        // off rather than take turns with it as fast as the network allows.
        const empty = !(body.messages && body.messages.length) && !body.gap;
        early = timeout > 0 && empty && Date.now() - asked < 1000 ? early + 1 : 0;
        if (early) await this._pause(this._backoff(early), poll.abort.signal);
      }
    } catch (err) {
      // A fetch that fails is a TypeError: offline, which the state says.
      if (err.name !== "AbortError" && err.name !== "TypeError") {
        this._emit("error", { error: err, transport: "poll" });
      }
    } finally {
      if (this._poll === poll) this._poll = null;
      poll.abort.abort();
    }
    await probing;
    return { served, conn: poll.conn, retryAfter };
  }

  /** Wait `ms`, or less if `signal` aborts; resolve true if it did. */
  _pause(ms, signal) {
    return new Promise((resolve) => {
      if (signal.aborted) return resolve(true);
      const timer = setTimeout(() => resolve(false), ms);
      signal.addEventListener(
        "abort",
        () => {
          clearTimeout(timer);
          resolve(true);
        },
        { once: true },
      );
    });
  }

  /** While long-polling, try the WebSocket again after each retry delay. */
  async _probeWs(poll, generation) {
    const signal = poll.abort.signal;
    while (!signal.aborted && this.options.transports.includes("ws")) {
      const wait = Math.max(0, this._wsBlockedUntil - Date.now());
      const aborted = await this._pause(wait, signal);
      if (aborted || typeof WebSocket === "undefined") return;
      try {
        // A welcome aborts the poll (see _welcomed): from here on the
        // WebSocket carries everything after the last seq the page has.
        poll.conn = await this._openWs(generation);
        return;
      } catch (err) {
        if (err.code === CLOSE_BAD_TOKEN) this._forgetSession("token refused");
        this._wsRetryDelay = Math.min(this._wsRetryDelay * 2, this.options.wsRetryDelayMax);
        this._wsBlockedUntil = Date.now() + this._wsRetryDelay;
      }
    }
  }

  _onBatch(body, transport) {
    if (body.gap) this._emit("gap", { transport, after: this.lastSeq });
    for (const message of body.messages || []) this._receive(message);
    // After an empty poll or a gap, next_after moves past seqs that will
    // never come; the next poll then acknowledges them.
    if (Number.isInteger(body.next_after) && body.next_after > this.lastSeq) {
      this.lastSeq = body.next_after;
      this._save();
    }
  }

  async _createSession(signal) {
    const response = await this._http("POST", "/transport/sessions", undefined, signal);
    if (response.status !== 201) {
      throw new TransportError("session_refused", `session creation answered ${response.status}`);
    }
    const body = await response.json();
    this._newSession(body.session_id);
    this.token = body.token;
    this._save();
  }

  async _http(method, path, body, signal) {
    const headers = {};
    if (this.token) headers.Authorization = `Bearer ${this.token}`;
    if (body !== undefined) headers["Content-Type"] = "application/json";
    return fetch(this._base + path, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
      signal,
      cache: "no-store",
      credentials: "omit",
    });
  }

  // --- messages ----------------------------------------------------------------

  /** Hand a message to the page once: drop any seq it already has. */
  _receive(message) {
    if (!Number.isInteger(message.seq) || message.seq <= this.lastSeq) {
      this.duplicates += 1;
      return;
    }
    this.lastSeq = message.seq;
    this._save();
    if (message.message_type === "reply" && this._onReply(message.payload, "mailbox")) return;
    this._emit("message", {
      seq: message.seq,
      message_type: message.message_type,
      payload: message.payload,
      sent_at: message.sent_at,
    });
  }

  // --- actions -------------------------------------------------------------------

  _traceparent(explicit) {
    if (explicit) return explicit;
    const configured = this.options.traceparent;
    const value = typeof configured === "function" ? configured() : configured;
    return value || metaTraceparent();
  }

  _frame(pending) {
    const frame = { id: pending.id, action: pending.name, payload: pending.payload };
    if (pending.traceparent) frame.traceparent = pending.traceparent;
    return frame;
  }

  _send(pending) {
    if (!this._pending.has(String(pending.id))) return;
    if (this._ws) {
      if (this._ws.send({ type: "action", ...this._frame(pending) })) pending.via = this._ws;
    } else if (this.transport === "poll") {
      this._post(pending);
    }
  }

  _flushActions() {
    for (const pending of this._pending.values()) {
      if (pending.via === null) this._send(pending);
    }
  }

  async _post(pending) {
    pending.via = "poll";
    pending.attempts += 1;
    let response;
    try {
      response = await this._http("POST", "/transport/actions", this._frame(pending));
    } catch {
      return this._retryPost(pending);
    }
    if (response.status === 202) {
      pending.via = "late";
      return;
    }
    if (response.status === 200) {
      this._onReply(await response.json(), "poll");
      return;
    }
    if (response.status === 400 || response.status === 413) {
      const body = await response.json().catch(() => ({}));
      const error = body.error || {};
      this._settle(pending, null, new TransportError(error.code || "bad_request", error.message));
      return;
    }
    const seconds = Number.parseFloat(response.headers.get("Retry-After"));
    return this._retryPost(pending, Number.isFinite(seconds) ? seconds * 1000 : undefined);
  }

  /** Send a REST action again later, or over whatever transport is open then. */
  async _retryPost(pending, delay) {
    pending.via = "waiting";
    await new Promise((r) => setTimeout(r, delay ?? this._backoff(pending.attempts)));
    if (!this._pending.has(String(pending.id)) || pending.via !== "waiting") return;
    pending.via = null;
    this._send(pending);
  }

  /** Settle the pending action a reply answers; return false if none waits. */
  _onReply(reply, source) {
    if (!reply || reply.id === undefined) return false;
    const pending = this._pending.get(String(reply.id));
    if (!pending) return false;
    if (reply.ok) {
      this._settle(pending, reply.payload);
    } else if (reply.error && reply.error.code === "timeout" && source !== "mailbox") {
      // The server goes on waiting and delivers the reply to the mailbox.
      pending.via = "late";
    } else {
      const error = reply.error || {};
      this._settle(pending, null, new TransportError(error.code, error.message, { id: reply.id }));
    }
    return true;
  }

  _settle(pending, value, error) {
    if (!this._pending.delete(String(pending.id))) return;
    clearTimeout(pending.timer);
    if (error) pending.reject(error);
    else pending.resolve(value);
  }

  // --- session and storage ---------------------------------------------------------

  _newSession(sessionId) {
    const previous = this.sessionId;
    this.sessionId = sessionId;
    this.lastSeq = 0;
    if (previous !== sessionId) this._emit("session", { sessionId, previous });
  }

  _forgetSession(reason) {
    this.token = null;
    this.lastSeq = 0;
    this._save();
    this._emit("error", { error: new TransportError("invalid_token", reason) });
  }

  _load() {
    try {
      const saved = JSON.parse(this._storage.getItem(this.options.storageKey) || "null");
      if (saved && saved.v === STORAGE_VERSION) {
        this.token = saved.token || null;
        this.sessionId = saved.sessionId || null;
        this.lastSeq = Number.isInteger(saved.lastSeq) ? saved.lastSeq : 0;
      }
    } catch {
      // Unreadable state: start a new session.
    }
  }

  _save() {
    const state = {
      v: STORAGE_VERSION,
      token: this.token,
      sessionId: this.sessionId,
      lastSeq: this.lastSeq,
    };
    try {
      this._storage.setItem(this.options.storageKey, JSON.stringify(state));
    } catch {
      // Quota or privacy mode: the session then lasts as long as the page.
    }
  }

  // --- events ----------------------------------------------------------------------

  _setState(state) {
    if (this.state === state) return;
    const previous = this.state;
    this.state = state;
    this._emit("state", { state, previous });
    if (state === "connecting" || state === "offline") this._emit(state, { previous });
  }

  _setTransport(transport) {
    if (this.transport === transport) return;
    const previous = this.transport;
    this.transport = transport;
    this._emit("transport", { transport, previous });
  }

  _emit(type, detail) {
    this.dispatchEvent(new CustomEvent(type, { detail }));
  }
}
