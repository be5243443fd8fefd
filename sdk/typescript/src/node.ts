// The runtime of node software: the user writes one async handler; this owns the NodeSession
// protocol (register, ack, heartbeat, results and their confirmation, cancels, reconnects, drain).
import { EventEmitter } from "node:events";
import { setTimeout as sleep } from "node:timers/promises";
import { create } from "@bufbuild/protobuf";
import { durationMs } from "@bufbuild/protobuf/wkt";
import { Code, createClient, type Client as GeneratedClient } from "@connectrpc/connect";
import { jobResult, type JobResultInput, pair, type PairInput } from "./convert.js";
import { FatalError, ModelUnavailableError, RetryableError, type SchedulerError, toSchedulerError } from "./errors.js";
import { SDK_VERSION } from "./version.js";
import {
  type Assignment as AssignmentMessage, type Completion, CompletionSchema, type JobError, JobErrorSchema,
  type JobLease, JobLeaseSchema, type JobResult, type JobSpec, type LeaseStatus, LeaseStatusSchema, type NodeMessage,
  NodeMessageSchema, PongSchema, type RegisterAck, Scheduler, type SchedulerMessage,
} from "./gen/lingua/scheduler/v1/scheduler_pb.js";
import { AsyncQueue } from "./queue.js";
import { connect, type Connection, type ConnectionOptions } from "./transport.js";

/** One job given to the handler. The lease (attempt fencing, token) stays with the runtime. */
export interface Assignment {
  jobId: string;
  /** 1 for the first attempt, 2 after one retry, ... */
  attempt: number;
  /** What to do: languages, payload or payloadRef, traceId, deadline. */
  spec: JobSpec;
  /** Aborts when the scheduler takes the job back (cancelled, expired, lease lost) or the node stops
   * for good; stop working then: whatever the handler returns afterwards is dropped. */
  signal: AbortSignal;
}

/** Returns the result of a successful job; throws RetryableError, FatalError or
 * ModelUnavailableError to report otherwise (any other error counts as retryable). */
export type Handler = (assignment: Assignment) => Promise<JobResultInput | JobResult | void>;

export interface NodeOptions extends ConnectionOptions {
  /** Unique, stable id of this node (1 to 128 printable ASCII characters). */
  nodeId: string;
  /** The directed pairs it serves: "zh:en", ["zh", "en"] or { srcLang, tgtLang }. */
  pairs: readonly PairInput[];
  /** How many jobs run at once (1 to 1024). */
  concurrency: number;
  handler: Handler;
  labels?: Record<string, string>;
  /** Shown by ListNodes; default `lingua-sdk-typescript/<SDK_VERSION>` (the Python SDK: `lingua-sdk-python/<version>`). */
  version?: string;
  /** Reconnect backoff: first delay and cap, in ms (doubling, with jitter). Default 100 and 5000. */
  reconnectInitialMs?: number;
  reconnectMaxMs?: number;
  /** An outcome the scheduler has not answered (confirmed or refused) within this long on the same
   * stream is sent again; the scheduler confirms a repeat of a stored outcome without storing it
   * twice. Default 10 000 ms. */
  resendAfterMs?: number;
  /** How long stop() lets running jobs finish (and their results be confirmed) before it aborts
   * them and closes. Default 30 000 ms. */
  drainTimeoutMs?: number;
  /** Drain on SIGTERM and SIGINT while run() is running (a second signal stops at once). Default true. */
  handleSignals?: boolean;
}

/** What a Node reports, for logs, metrics and tests (it is an EventEmitter). */
export interface NodeEvents {
  /** A stream was registered (again, after a reconnect). */
  registered: [ack: RegisterAck];
  /** A stream ended; run() reconnects unless the node is stopping. */
  disconnected: [error: SchedulerError | undefined];
  /** A job was handed to the handler. */
  assigned: [assignment: Assignment];
  /** The handler of a job finished (the outcome is sent, awaiting confirmation). */
  finished: [jobId: string, outcome: Completion["outcome"] | { case: "unavailable" }];
  /** The scheduler stored a result or failure: the node has forgotten it. */
  confirmed: [status: LeaseStatus];
  /** The scheduler refused an ack, heartbeat, holding entry or result (status.errorCode and
   * status.reason say why). A refusal with errorCode "UNAVAILABLE" (reason STORE_UNAVAILABLE) is
   * transient: the job keeps running and its outcome is kept and sent again with backoff. */
  refused: [status: LeaseStatus];
  /** The scheduler took a job back; its handler's signal was aborted. */
  cancelled: [jobId: string];
  /** Heartbeats were sent for this many running jobs. */
  heartbeat: [count: number];
  /** The scheduler pinged the stream (it carried nothing from the node for a while); the runtime
   * answered at once. A stream that leaves a ping unanswered is ended by the scheduler as dead. */
  ping: [id: bigint];
  /** A problem the runtime handled: a message the scheduler did not understand, results lost at
   * a forced stop, a handler that threw after its job was taken away. */
  warning: [message: string];
}

interface Work {
  lease: JobLease;
  assignment: Assignment;
  abort: AbortController;
}

/** An outcome sent (or to send) and not yet confirmed or refused. */
interface Pending {
  completion: Completion;
  /** When to send it again if still unanswered (Date.now() ms). */
  dueAt: number;
  /** The next backoff after an UNAVAILABLE refusal (ms). */
  backoffMs: number;
}

/** Errors of a registration that retrying cannot fix: run() rejects with them. */
const PERMANENT = new Set([Code.InvalidArgument, Code.Unauthenticated, Code.PermissionDenied, Code.Unimplemented]);

const ERROR_CODE = /^[\x21-\x7e]{1,128}$/;

/**
 * A worker node: `await new Node(target, { nodeId, pairs, concurrency, handler }).run()`.
 *
 * run() holds a NodeSession stream: it registers, gives each assignment to `handler` (at most
 * `concurrency` at once), acks it, heartbeats while it runs, and sends the outcome; it keeps every
 * outcome until the scheduler confirms (or refuses) it and sends it again after a reconnect.
 * A lost stream is reopened with exponential backoff, declaring the jobs still running so their
 * leases are kept. stop() (or SIGTERM) drains: no new work, running jobs finish, then run() resolves.
 */
export class Node extends EventEmitter<NodeEvents> {
  readonly nodeId: string;
  readonly #options: NodeOptions;
  readonly #connection: Connection;
  readonly #stub: GeneratedClient<typeof Scheduler>;
  /** Jobs whose handler runs (or waits for a slot), by job id. */
  readonly #jobs = new Map<string, Work>();
  readonly #waiting: Work[] = [];
  #running = 0;
  /** Outcomes sent (or to send) and not yet confirmed or refused, by job id. */
  readonly #unconfirmed = new Map<string, Pending>();
  /** "Model not available" reports not yet written to a stream. */
  readonly #unavailable: JobLease[] = [];
  /** The request side of the current stream, once registered; undefined between streams. */
  #out: AsyncQueue<NodeMessage> | undefined;
  #batch: NodeMessage | undefined;
  #draining = false;
  #stopping: AbortController | undefined;
  /** Aborted at a forced stop: ends the stream and any backoff. */
  readonly #halt = new AbortController();
  /** Aborted by stop() to cut a reconnect backoff short. */
  #backoff: AbortController | undefined;
  #run: Promise<void> | undefined;

  constructor(target: string, options: NodeOptions) {
    super();
    if (!Number.isInteger(options.concurrency) || options.concurrency < 1) {
      throw new TypeError("concurrency: a whole number, 1 or more");
    }
    this.nodeId = options.nodeId;
    this.#options = options;
    this.#connection = connect(target, options);
    this.#stub = createClient(Scheduler, this.#connection.transport);
  }

  /** Jobs whose handler is running or waiting for a slot. */
  get inFlight(): number {
    return this.#jobs.size;
  }

  /** Outcomes not yet confirmed by the scheduler. */
  get unconfirmed(): number {
    return this.#unconfirmed.size;
  }

  /** Serves until stop() (or SIGTERM/SIGINT) has drained the node. Rejects only when the
   * scheduler refuses the registration for good (INVALID_ARGUMENT, UNAUTHENTICATED, ...). */
  run(): Promise<void> {
    this.#run ??= this.#serve();
    return this.#run;
  }

  /** Drains: asks for no new work, lets running jobs finish and their outcomes be confirmed, then
   * closes. After `drainTimeoutMs` the handlers still running are aborted and run() resolves.
   * Resolves when run() has ended. */
  async stop(): Promise<void> {
    if (!this.#stopping) {
      this.#stopping = new AbortController();
      this.#draining = true;
      // Jobs that never got a slot go back to the pool at once rather than at their ack timeout.
      for (const work of this.#waiting.splice(0)) {
        this.#jobs.delete(work.lease.jobId);
        if (this.#out) this.#queue({ unavailable: [work.lease] });
        else this.#unavailable.push(work.lease);
      }
      // Its own message, ahead of the outcomes that follow: the scheduler must not refill the slot
      // a result frees.
      this.#queue({ drain: true });
      this.#flush();
      this.#backoff?.abort(); // between streams: reconnect now to drain (or end, if nothing is left)
      if (!this.#run) this.#halt.abort();
      const timeout = this.#options.drainTimeoutMs ?? 30_000;
      sleep(timeout, undefined, { signal: this.#stopping.signal, ref: false }).then(
        () => this.#forceStop(`drain did not finish within ${timeout} ms`), () => undefined);
      this.#checkDrained();
    }
    if (this.#run) await this.#run.catch(() => undefined);
    this.#connection.close();
  }

  /** Stops at once, without draining: aborts the running handlers, drops the outcomes not yet
   * confirmed (the scheduler requeues what the node held once its stream grace passes) and closes.
   * Resolves when run() has ended. */
  async close(): Promise<void> {
    this.#draining = true;
    this.#stopping ??= new AbortController();
    this.#forceStop("closed");
    if (this.#run) await this.#run.catch(() => undefined);
    this.#connection.close();
  }

  async #serve(): Promise<void> {
    // The first SIGTERM/SIGINT drains; a second one stops at once.
    const onSignal = (): void => void (this.#stopping ? this.close() : this.stop());
    const signals = this.#options.handleSignals ?? true ? (["SIGTERM", "SIGINT"] as const) : [];
    for (const s of signals) process.on(s, onSignal);
    const initial = this.#options.reconnectInitialMs ?? 100;
    let delay = initial;
    try {
      while (!this.#halt.signal.aborted && !this.#isDrained()) {
        let registeredAt: number | undefined;
        try {
          await this.#session(() => (registeredAt = Date.now()));
          this.emit("disconnected", undefined);
        } catch (err) {
          const error = toSchedulerError(err);
          if (this.#halt.signal.aborted) break;
          if (registeredAt === undefined && PERMANENT.has(error.code)) throw error;
          this.emit("disconnected", error);
        }
        if (this.#isDrained()) break;
        if (this.#draining && !this.#jobs.size) {
          // Only outcomes are left to settle: a new stream would be handed new work, so use the
          // unary Complete instead.
          await this.#settleUnary(initial);
          break;
        }
        // Back off from the first delay again only after a stream that lived a while: a scheduler
        // that accepts and drops streams at once must not be hammered.
        if (registeredAt !== undefined && Date.now() - registeredAt >= 1_000) delay = initial;
        this.#backoff = new AbortController();
        const wake = AbortSignal.any([this.#halt.signal, this.#backoff.signal]);
        await sleep(delay * (0.5 + Math.random()), undefined, { signal: wake }).catch(() => undefined);
        delay = Math.min(delay * 2, this.#options.reconnectMaxMs ?? 5_000);
      }
    } finally {
      for (const s of signals) process.off(s, onSignal);
      this.#stopping?.abort();
      this.#connection.close();
    }
  }

  /** Sends each unconfirmed outcome with the unary Complete until it is stored or refused,
   * retrying while the scheduler is unreachable (until a forced stop). */
  async #settleUnary(initialDelayMs: number): Promise<void> {
    for (const [jobId, { completion }] of this.#unconfirmed) {
      const { lease, outcome } = completion;
      const leaseToken = lease!.leaseToken;
      let delay = initialDelayMs;
      while (!this.#halt.signal.aborted) {
        try {
          const done = await this.#stub.complete({
            jobId, attempt: lease!.attempt, leaseToken: lease!.leaseToken, nodeId: this.nodeId, outcome,
          }, { signal: this.#halt.signal });
          this.#unconfirmed.delete(jobId);
          this.emit("confirmed", create(LeaseStatusSchema, { jobId, leaseToken, ok: true, state: done.state }));
          break;
        } catch (err) {
          const error = toSchedulerError(err);
          if (this.#halt.signal.aborted) return;
          if (error.code === Code.Unavailable || error.code === Code.DeadlineExceeded) {
            await sleep(delay * (0.5 + Math.random()), undefined, { signal: this.#halt.signal }).catch(() => undefined);
            delay = Math.min(delay * 2, this.#options.reconnectMaxMs ?? 5_000);
            continue;
          }
          this.#unconfirmed.delete(jobId);
          this.emit("refused", create(LeaseStatusSchema, {
            jobId, leaseToken, ok: false, errorCode: error.codeName, errorMessage: error.rawMessage,
            reason: error.reason ?? "",
          }));
          break;
        }
      }
    }
  }

  /** One NodeSession stream, from register to its end. */
  async #session(onRegistered: () => void): Promise<void> {
    const out = new AsyncQueue<NodeMessage>();
    const o = this.#options;
    // A draining node says so on its register message: nothing is assigned to it in between.
    out.push(create(NodeMessageSchema, {
      drain: this.#draining,
      register: {
        nodeId: o.nodeId, pairs: o.pairs.map(pair), maxConcurrency: o.concurrency, labels: o.labels ?? {},
        version: o.version ?? `lingua-sdk-typescript/${SDK_VERSION}`, holding: [...this.#jobs.values()].map((w) => w.lease),
      },
    }));
    let heartbeat: NodeJS.Timeout | undefined;
    const done = new AbortController();
    const onHalt = (): void => done.abort();
    this.#halt.signal.addEventListener("abort", onHalt);
    try {
      for await (const message of this.#stub.nodeSession(out, { signal: done.signal })) {
        if (message.registered) {
          onRegistered();
          this.#out = out;
          // Everything the previous stream did not settle: outcomes and unavailable reports.
          this.#queue({ unavailable: this.#unavailable.splice(0) });
          for (const pending of this.#unconfirmed.values()) this.#send(pending);
          const interval = message.registered.heartbeatInterval;
          const every = interval ? durationMs(interval) : 1_000;
          heartbeat = setInterval(() => {
            this.#heartbeat();
            this.#resendDue();
          }, Math.max(every, 10));
          this.emit("registered", message.registered);
        }
        this.#receive(message);
      }
    } finally {
      clearInterval(heartbeat);
      this.#halt.signal.removeEventListener("abort", onHalt);
      if (this.#out === out) this.#out = undefined;
      out.close();
    }
  }

  #receive(message: SchedulerMessage): void {
    if (message.ping) {
      this.#queue({ pong: create(PongSchema, { id: message.ping.id }) });
      this.emit("ping", message.ping.id);
    }
    for (const lease of message.cancels) {
      const work = this.#jobs.get(lease.jobId);
      if (work && work.lease.attempt === lease.attempt && sameToken(work.lease, lease)) {
        this.#drop(work, "the scheduler took the job back");
        this.emit("cancelled", lease.jobId);
      }
    }
    for (const status of message.refused) {
      // UNAVAILABLE: the job store could not be reached; the lease may still be ours. Keep the job
      // running (its next heartbeat goes as usual) and send the same outcome again, with backoff.
      const transient = status.errorCode === "UNAVAILABLE";
      const pending = this.#unconfirmed.get(status.jobId);
      if (pending && sameToken(pending.completion.lease!, status)) {
        if (transient) this.#backOff(pending);
        else this.#settle(status.jobId);
      } else {
        // A refused ack, heartbeat or holding entry: unless transient, the lease is gone.
        const work = this.#jobs.get(status.jobId);
        if (work && sameToken(work.lease, status) && !transient) {
          this.#drop(work, `lease refused: ${status.errorCode} ${status.errorMessage}`);
        }
      }
      this.emit("refused", status);
    }
    for (const status of message.confirmed) {
      const pending = this.#unconfirmed.get(status.jobId);
      if (pending && sameToken(pending.completion.lease!, status)) this.#settle(status.jobId);
      this.emit("confirmed", status);
    }
    if (message.error) {
      // A whole message failed (the job store unreachable): what it carried is sent again soon.
      if (message.error.startsWith("UNAVAILABLE")) for (const pending of this.#unconfirmed.values()) this.#backOff(pending);
      this.emit("warning", `scheduler: ${message.error}`);
    }
    for (const assignment of message.assignments) this.#accept(assignment);
    // DrainNode: an operator drained this node; as stop(), and run() resolves once drained.
    if (message.drain && !this.#stopping) void this.stop();
  }

  #accept(message: AssignmentMessage): void {
    const held = this.#jobs.get(message.jobId);
    if (held?.lease.leaseToken === message.leaseToken) return; // a repeat of the claim we hold
    if (held) {
      // A new claim of a job we still hold (the old lease was lost, e.g. expired): the old work is
      // wasted; the new claim is the one to work on.
      this.#drop(held, "a new claim of the job replaced this one");
    }
    const stale = this.#unconfirmed.get(message.jobId);
    if (stale && stale.completion.lease!.leaseToken !== message.leaseToken) this.#settle(message.jobId);
    const lease = create(JobLeaseSchema, {
      jobId: message.jobId, attempt: message.attempt, leaseToken: message.leaseToken,
    });
    if (this.#draining) {
      this.#queue({ unavailable: [lease] }); // crossed our drain: back to the pool at once
      return;
    }
    const abort = new AbortController();
    const work: Work = {
      lease, abort,
      assignment: { jobId: message.jobId, attempt: message.attempt, spec: message.spec!, signal: abort.signal },
    };
    this.#jobs.set(message.jobId, work);
    this.#waiting.push(work);
    this.#startWaiting();
  }

  #startWaiting(): void {
    while (this.#running < this.#options.concurrency && this.#waiting.length) {
      const work = this.#waiting.shift()!;
      this.#running++;
      this.#queue({ acks: [work.lease] });
      this.emit("assigned", work.assignment);
      void this.#work(work).finally(() => {
        this.#running--;
        this.#startWaiting();
      });
    }
  }

  async #work(work: Work): Promise<void> {
    let outcome: Completion["outcome"] | { case: "unavailable" };
    try {
      const result = await this.#options.handler(work.assignment);
      outcome = { case: "result", value: jobResult(result ?? {}) };
    } catch (err) {
      if (err instanceof ModelUnavailableError) outcome = { case: "unavailable" };
      else outcome = { case: "error", value: jobError(err) };
    }
    if (this.#jobs.get(work.lease.jobId) !== work) return; // taken back meanwhile: nobody wants it
    this.#jobs.delete(work.lease.jobId);
    if (outcome.case === "unavailable") {
      if (this.#out) this.#queue({ unavailable: [work.lease] });
      else this.#unavailable.push(work.lease);
    } else {
      const pending: Pending = {
        completion: create(CompletionSchema, { lease: work.lease, outcome }), dueAt: 0,
        backoffMs: this.#options.reconnectInitialMs ?? 100,
      };
      this.#unconfirmed.set(work.lease.jobId, pending);
      this.#send(pending);
    }
    this.emit("finished", work.lease.jobId, outcome);
    this.#checkDrained();
  }

  /** Stops a job's handler and forgets the job (no outcome will be sent). */
  #drop(work: Work, why: string): void {
    if (this.#jobs.get(work.lease.jobId) !== work) return;
    this.#jobs.delete(work.lease.jobId);
    const waiting = this.#waiting.indexOf(work);
    if (waiting >= 0) this.#waiting.splice(waiting, 1);
    work.abort.abort(new Error(`job ${work.lease.jobId}: ${why}`));
    this.#checkDrained();
  }

  /** Sends an outcome (again), to be sent once more if it is still unanswered after resendAfterMs. */
  #send(pending: Pending): void {
    pending.dueAt = Date.now() + (this.#options.resendAfterMs ?? 10_000);
    this.#queue({ completions: [pending.completion] });
  }

  /** After an UNAVAILABLE refusal: the same outcome goes again after a jittered, doubling delay. */
  #backOff(pending: Pending): void {
    pending.dueAt = Date.now() + pending.backoffMs * (0.5 + Math.random());
    pending.backoffMs = Math.min(pending.backoffMs * 2, this.#options.reconnectMaxMs ?? 5_000);
  }

  #resendDue(): void {
    const now = Date.now();
    for (const pending of this.#unconfirmed.values()) if (pending.dueAt <= now) this.#send(pending);
  }

  /** The scheduler answered an outcome for good (stored, or refused): forget it. */
  #settle(jobId: string): void {
    this.#unconfirmed.delete(jobId);
    this.#checkDrained();
  }

  #heartbeat(): void {
    const leases = [...this.#jobs.values()].filter((w) => !this.#waiting.includes(w)).map((w) => w.lease);
    if (leases.length) {
      this.#queue({ heartbeats: leases });
      this.emit("heartbeat", leases.length);
    }
  }

  /** Adds to the message sent at the end of this turn of the event loop (one message carries all
   * the acks, heartbeats and outcomes of a turn). Dropped while no stream is registered: the next
   * registration declares the running jobs and resends the unconfirmed outcomes. */
  #queue(part: Partial<Pick<NodeMessage, "acks" | "heartbeats" | "completions" | "unavailable" | "drain" | "pong">>): void {
    if (!this.#out) return;
    if (!this.#batch) {
      this.#batch = create(NodeMessageSchema);
      setImmediate(() => this.#flush());
    }
    const b = this.#batch;
    b.acks.push(...(part.acks ?? []));
    b.heartbeats.push(...(part.heartbeats ?? []));
    b.completions.push(...(part.completions ?? []));
    b.unavailable.push(...(part.unavailable ?? []));
    b.drain ||= part.drain ?? false;
    b.pong = part.pong ?? b.pong;
  }

  #flush(): void {
    const batch = this.#batch;
    this.#batch = undefined;
    if (batch) this.#out?.push(batch);
  }

  #isDrained(): boolean {
    return this.#draining && this.#jobs.size === 0 && this.#unconfirmed.size === 0;
  }

  /** Once draining and nothing is left to settle: close our side of the stream. */
  #checkDrained(): void {
    if (this.#isDrained() && this.#out) {
      this.#flush();
      this.#out.close();
    }
  }

  #forceStop(why: string): void {
    for (const work of [...this.#jobs.values()]) this.#drop(work, "the node stopped");
    if (this.#unconfirmed.size) {
      this.emit("warning", `${why}: ${this.#unconfirmed.size} outcome(s) not confirmed by the scheduler`);
    }
    this.#unconfirmed.clear();
    this.#halt.abort();
  }
}

/** Whether an answer (or cancel) is about the lease held; an empty token (an older scheduler) matches. */
function sameToken(held: { leaseToken: string }, other: { leaseToken: string }): boolean {
  return !held.leaseToken || !other.leaseToken || held.leaseToken === other.leaseToken;
}

/** The JobError reported for what a handler threw, as the Python SDK reports it: RetryableError and
 * FatalError give their code and message; anything else (or an unusable code) is retryable (unless
 * a FatalError), code HANDLER_EXCEPTION, message "Name: message". */
function jobError(err: unknown): JobError {
  const retryable = !(err instanceof FatalError);
  if ((err instanceof FatalError || err instanceof RetryableError) && ERROR_CODE.test(err.code)
    && !err.code.startsWith("LINGUA_")) {
    return create(JobErrorSchema, { code: err.code, message: err.message.slice(0, 4096), retryable });
  }
  const message = err instanceof Error ? `${err.name}: ${err.message}` : String(err);
  return create(JobErrorSchema, { code: "HANDLER_EXCEPTION", message: message.slice(0, 4096), retryable });
}
