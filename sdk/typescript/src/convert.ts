// Plain data at the surface, generated messages underneath: the conversions between the two.
import { create, createRegistry, type Message, toJson } from "@bufbuild/protobuf";
import { durationFromMs, durationMs, timestampFromDate } from "@bufbuild/protobuf/wkt";
import {
  file_lingua_scheduler_v1_scheduler, type JobResult, JobResultSchema, type JobSpec, JobSpecSchema, JobState, type LanguagePair, LanguagePairSchema,
} from "./gen/lingua/scheduler/v1/scheduler_pb.js";

export { durationMs };

/** What a client asks to be done: the fields of a JobSpec, in plain types. */
export interface JobSpecInput {
  /** Required: the tenant; scopes idempotency keys and sessions. */
  tenantId: string;
  /** Required: the conversation the utterance belongs to. */
  sessionId: string;
  /** Index of the utterance within its session, 0 or more. Default 0. */
  utteranceIndex?: number | bigint;
  /** Source and target language tags ("zh", "en", "pt-br"). */
  srcLang: string;
  tgtLang: string;
  traceId?: string;
  /** 0 (lowest) to 9 (highest). */
  priority?: number;
  /** When the job stops being worth doing. */
  deadline?: Date;
  /** 0 or absent: the server default. */
  maxAttempts?: number;
  idempotencyKey?: string;
  /** Inline input (a string is sent as UTF-8); prefer payloadRef. */
  payload?: Uint8Array | string;
  /** Where the node finds the input: "s3://...", "session://<session>/<index>". */
  payloadRef?: string;
  /** The longest one attempt may run; absent: the server default. */
  executionTimeoutMs?: number;
  /** W3C trace context ("traceparent", "tracestate") of the submit, at most 8 entries of 512
   * characters: fill it with @opentelemetry/api's `propagation.inject(context.active(), traceContext)`
   * to make the job's work part of your trace (see the README). Carried to the node unchanged, or,
   * when the scheduler traces, replaced by its submit span's context (in the same trace). */
  traceContext?: Record<string, string>;
}

/** What a node handler returns for a successful job: the fields of a JobResult, in plain types. */
export interface JobResultInput {
  textAsr?: string;
  textTranslated?: string;
  ttsAudio?: Uint8Array;
  ttsAudioRef?: string;
  ttsFormat?: string;
  extra?: Record<string, string>;
}

/** A language pair: "zh:en", ["zh", "en"] or { srcLang, tgtLang }. */
export type PairInput = string | readonly [string, string] | { srcLang: string; tgtLang: string };

export function jobSpec(input: JobSpecInput): JobSpec {
  const { deadline, executionTimeoutMs, payload, utteranceIndex = 0, ...rest } = input;
  for (const [field, value] of Object.entries({ utteranceIndex, priority: rest.priority, maxAttempts: rest.maxAttempts })) {
    if (value !== undefined && !(typeof value === "bigint" || Number.isSafeInteger(value))) {
      throw new TypeError(`${field}: expected a whole number, got ${String(value)}`);
    }
  }
  return create(JobSpecSchema, {
    ...rest,
    utteranceIndex: BigInt(utteranceIndex),
    ...(deadline !== undefined && { deadline: timestampFromDate(deadline) }),
    ...(executionTimeoutMs !== undefined && { executionTimeout: durationFromMs(executionTimeoutMs) }),
    ...(payload !== undefined && { payload: typeof payload === "string" ? new TextEncoder().encode(payload) : payload }),
  });
}

export function jobResult(input: JobResultInput | JobResult): JobResult {
  return create(JobResultSchema, input);
}

export function pair(input: PairInput): LanguagePair {
  if (typeof input === "string") {
    const [srcLang, tgtLang, ...more] = input.split(":");
    if (!srcLang || !tgtLang || more.length) throw new TypeError(`pair ${JSON.stringify(input)}: expected "src:tgt"`);
    return create(LanguagePairSchema, { srcLang, tgtLang });
  }
  if (Array.isArray(input)) return create(LanguagePairSchema, { srcLang: input[0], tgtLang: input[1] });
  const { srcLang, tgtLang } = input as { srcLang: string; tgtLang: string };
  return create(LanguagePairSchema, { srcLang, tgtLang });
}

const TERMINAL = new Set([JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED, JobState.EXPIRED]);

/** True for SUCCEEDED, FAILED, CANCELLED and EXPIRED. */
export function isTerminal(state: JobState): boolean {
  return TERMINAL.has(state);
}

/** A job state's name, as the Python SDK and the `lingua` command line print it. */
export type StateName = "unspecified" | "queued" | "assigned" | "running" | "succeeded" | "failed" | "cancelled" | "expired";

/** "succeeded" for JobState.SUCCEEDED (the Python SDK's JobState value). */
export function stateName(state: JobState): StateName {
  return (JobState[state] ?? "UNSPECIFIED").toLowerCase() as StateName;
}

const registry = createRegistry(file_lingua_scheduler_v1_scheduler);

/** Gives a message a toJSON() (not enumerable), so JSON.stringify works despite its bigint fields:
 * the proto3 JSON form (int64 as strings, enums and Timestamps as strings, every field present). */
export function jsonable<T extends Message>(message: T): T {
  const schema = registry.getMessage(message.$typeName);
  if (schema) {
    Object.defineProperty(message, "toJSON", {
      value: () => toJson(schema, message, { alwaysEmitImplicit: true }), enumerable: false, configurable: true,
    });
  }
  return message;
}

/** A message with a `state`, as the client returns it: also JSON-serialisable (see jsonable). */
export type WithStateName<T> = T & {
  /** `state` by name: "queued", "succeeded", ... (stateName(state)). */
  stateName: StateName;
};

export function withStateName<T extends Message & { state: JobState }>(message: T): WithStateName<T> {
  return Object.assign(jsonable(message), { stateName: stateName(message.state) });
}
