// The client of application developers: submit utterances, read and wait for results.
import { setTimeout as sleep } from "node:timers/promises";
import { Code, ConnectError, createClient, type Client as GeneratedClient } from "@connectrpc/connect";
import {
  isTerminal, jobSpec, type JobSpecInput, jsonable, type StateName, withStateName, type WithStateName,
} from "./convert.js";
import { call, toSchedulerError, UnavailableError } from "./errors.js";
import { timestampFromDate } from "@bufbuild/protobuf/wkt";
import {
  type CancelSessionResponse, type GetStatsResponse, type Job, type JobEvent, JobState, type NodeInfo, type PoolState,
  Scheduler, type SessionEvent, type SubmitResult,
} from "./gen/lingua/scheduler/v1/scheduler_pb.js";
import { connect, type Connection, type ConnectionOptions } from "./transport.js";

export type ClientOptions = ConnectionOptions;

/** The results are the generated messages (int64 fields such as `version`, `utteranceIndex` and
 * Timestamps' `seconds` are bigint), each with a toJSON() so JSON.stringify works (proto3 JSON:
 * int64 as strings, enums by name); jobs, events and submit results also carry `stateName`. */
export type JobView = WithStateName<Job>;
export type JobEventView = WithStateName<JobEvent>;
export type SubmitResultView = WithStateName<SubmitResult>;

/** ListJobs' filters: a pool ("zh:en"), a state (by name or value), a tenant, a session (with its
 * tenant), and paging. */
export interface ListJobsFilter {
  pool?: string;
  state?: StateName | JobState;
  tenantId?: string;
  sessionId?: string;
  /** 1 to 500; absent or 0: 50. */
  pageSize?: number;
  pageToken?: string;
}

function stateOf(name: StateName): JobState {
  const value = JobState[name.toUpperCase() as keyof typeof JobState];
  if (value === undefined) throw new TypeError(`state: ${JSON.stringify(name)} is not a job state`);
  return value;
}

/** Per call: an AbortSignal cancels the call (it rejects with CancelledError); timeoutMs sets a
 * gRPC deadline (DeadlineExceededError). */
export interface CallOptions {
  signal?: AbortSignal;
  timeoutMs?: number;
}

/**
 * A scheduler client over one HTTP/2 connection.
 *
 * ```ts
 * const client = new Client("127.0.0.1:50051");
 * const { jobId } = await client.submit({ tenantId: "acme", sessionId: "s1", utteranceIndex: 0,
 *   srcLang: "zh", tgtLang: "en", payloadRef: "s3://audio/s1/0.opus" });
 * const job = await client.wait(jobId, { timeoutMs: 30_000 });
 * ```
 */
export class Client {
  /** The generated client, for what this class does not wrap. */
  readonly stub: GeneratedClient<typeof Scheduler>;
  readonly #connection: Connection;

  /** `target`: "host:port" or an http(s):// URL. */
  constructor(target: string, options: ClientOptions = {}) {
    this.#connection = connect(target, options);
    this.stub = createClient(Scheduler, this.#connection.transport);
  }

  /** Submits one job; resolves to its id, whether it was created (false for a repeat) and its state. */
  async submit(spec: JobSpecInput, options: CallOptions = {}): Promise<SubmitResultView> {
    const [result] = await this.submitMany([spec], options);
    return result!;
  }

  /** Submits a batch, validated as a whole (one invalid job rejects it all); results in order. */
  async submitMany(specs: readonly JobSpecInput[], options: CallOptions = {}): Promise<SubmitResultView[]> {
    const response = await call(() => this.stub.submit({ jobs: specs.map(jobSpec) }, options));
    return response.results.map(withStateName);
  }

  /** Reads one job: state, attempt, node, last error and result. */
  async get(jobId: string, options: CallOptions & { includePayload?: boolean } = {}): Promise<JobView> {
    const { includePayload = false, ...rest } = options;
    return withStateName(await call(() => this.stub.getJob({ jobId, includePayload }, rest)));
  }

  /** Every state change of one job, oldest first, ending after the terminal state. */
  async *watch(jobId: string, options: CallOptions = {}): AsyncGenerator<JobEventView> {
    try {
      for await (const event of this.stub.watchJob({ jobId }, options)) yield withStateName(event);
    } catch (err) {
      throw toSchedulerError(err);
    }
  }

  /** Waits for the job to reach a terminal state and returns it (result included). Rejects with
   * DeadlineExceededError after `timeoutMs`, CancelledError when `signal` aborts. A watch cut by an
   * instance going away (UNAVAILABLE, or the stream ending early) is opened again. */
  async wait(jobId: string, options: { timeoutMs?: number; signal?: AbortSignal } = {}): Promise<JobView> {
    const timeout = options.timeoutMs === undefined ? undefined : AbortSignal.timeout(options.timeoutMs);
    const signals = [options.signal, timeout].filter((s): s is AbortSignal => s !== undefined);
    const signal = signals.length ? AbortSignal.any(signals) : undefined;
    let delayMs = 50;
    try {
      for (;;) {
        try {
          for await (const event of this.watch(jobId, { signal })) {
            if (isTerminal(event.state)) return await this.get(jobId, { signal });
          }
        } catch (err) {
          if (!(err instanceof UnavailableError) || signal?.aborted) throw err;
        }
        await sleep(delayMs, undefined, { signal });
        delayMs = Math.min(delayMs * 2, 2_000);
      }
    } catch (err) {
      if (timeout?.aborted && !options.signal?.aborted) {
        throw toSchedulerError(new ConnectError(`job ${jobId} not finished after ${options.timeoutMs} ms`,
          Code.DeadlineExceeded));
      }
      throw toSchedulerError(err);
    }
  }

  /** Cancels a job that is not terminal yet; resolves to the job after the change. */
  async cancel(jobId: string, options: CallOptions & { reason?: string } = {}): Promise<JobView> {
    const { reason = "", ...rest } = options;
    return withStateName(await call(() => this.stub.cancelJob({ jobId, reason }, rest)));
  }

  /** The nodes registered now, with their pools and load. */
  async listNodes(options: CallOptions = {}): Promise<NodeInfo[]> {
    return (await call(() => this.stub.listNodes({}, options))).nodes.map(jsonable);
  }

  /** The session's finished jobs (succeeded, failed, cancelled, expired) in utterance order, in
   * batches, from utterance `fromIndex` on (only `tgtLang`'s, when given); runs until `signal` aborts.
   * A stream cut by an instance going away (UNAVAILABLE) is opened again from the last resumeIndex,
   * without repeating a job. */
  async *watchSession(tenantId: string, sessionId: string,
    options: CallOptions & { fromIndex?: number | bigint; tgtLang?: string } = {}):
    AsyncGenerator<SessionEvent & { jobs: JobView[] }> {
    const { fromIndex = 0, tgtLang = "", ...rest } = options;
    let resume = BigInt(fromIndex);
    let sent = new Set<string>(); // job ids delivered at `resume` (the server sends them again)
    for (;;) {
      try {
        for await (const event of this.stub.watchSession({ tenantId, sessionId, fromIndex: resume, tgtLang }, rest)) {
          const jobs = event.jobs.filter((j) => !sent.has(j.jobId));
          const atResume = event.jobs.filter((j) => j.spec?.utteranceIndex === event.resumeIndex).map((j) => j.jobId);
          sent = new Set(event.resumeIndex === resume ? [...sent, ...atResume] : atResume);
          resume = event.resumeIndex;
          if (jobs.length) yield jsonable({ ...event, jobs: jobs.map(withStateName) });
        }
      } catch (err) {
        if (!(err instanceof ConnectError && err.code === Code.Unavailable) || rest.signal?.aborted) {
          throw toSchedulerError(err);
        }
      }
      await sleep(200, undefined, { signal: rest.signal });
    }
  }

  // -- administration: the admin role (docs/operations.md) -------------------------------------

  /** One page of jobs, newest first, filtered (every filter optional; sessionId needs tenantId).
   * Pass `nextPageToken` back as `pageToken` for the next page ("" when there is none). */
  async listJobs(filter: ListJobsFilter = {}, options: CallOptions = {}): Promise<{ jobs: JobView[]; nextPageToken: string }> {
    const { state, ...rest } = filter;
    const request = { ...rest, state: typeof state === "string" ? stateOf(state) : state ?? JobState.UNSPECIFIED };
    const page = await call(() => this.stub.listJobs(request, options));
    return { jobs: page.jobs.map(withStateName), nextPageToken: page.nextPageToken };
  }

  /** Per pool (every pool, or `pool`): jobs by state, nodes, capacity, in-flight, rates, paused. */
  async getStats(pool = "", options: CallOptions = {}): Promise<GetStatsResponse> {
    return jsonable(await call(() => this.stub.getStats({ pool }, options)));
  }

  /** A FAILED or EXPIRED job back to QUEUED, with a fresh attempt budget and deadline. */
  async retry(jobId: string, options: CallOptions & { reason?: string; deadline?: Date; maxAttempts?: number } = {}):
    Promise<JobView> {
    const { reason = "", deadline, maxAttempts = 0, ...rest } = options;
    const request = { jobId, reason, maxAttempts, ...(deadline !== undefined && { deadline: timestampFromDate(deadline) }) };
    return withStateName(await call(() => this.stub.retryJob(request, rest)));
  }

  /** Cancels every unfinished job of a session (a speaker hung up). */
  async cancelSession(tenantId: string, sessionId: string, options: CallOptions & { reason?: string } = {}):
    Promise<CancelSessionResponse> {
    const { reason = "", ...rest } = options;
    return jsonable(await call(() => this.stub.cancelSession({ tenantId, sessionId, reason }, rest)));
  }

  /** Stops dispatching a pool ("src:tgt"): submits still queue, nothing is assigned until resumed. */
  async pausePool(pool: string, options: CallOptions & { reason?: string } = {}): Promise<PoolState> {
    const { reason = "", ...rest } = options;
    return jsonable(await call(() => this.stub.pausePool({ pool, reason }, rest)));
  }

  /** Dispatches a paused pool again. */
  async resumePool(pool: string, options: CallOptions = {}): Promise<PoolState> {
    return jsonable(await call(() => this.stub.resumePool({ pool }, options)));
  }

  /** Drains a node on whichever instance holds it: it finishes what it holds and gets nothing new. */
  async drainNode(nodeId: string, options: CallOptions = {}): Promise<NodeInfo> {
    return jsonable(await call(() => this.stub.drainNode({ nodeId }, options)));
  }

  /** Closes the connection; calls in progress fail. */
  close(): void {
    this.#connection.close();
  }
}
