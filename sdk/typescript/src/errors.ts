// Typed errors. Every failed call rejects with a SchedulerError subclass that carries the gRPC code
// and the decoded google.rpc details, so callers branch on `instanceof`, `code` or `reason`, never
// on message text.
import { Code, ConnectError } from "@connectrpc/connect";
import { durationMs } from "./convert.js";
import { BadRequestSchema, ErrorInfoSchema, RetryInfoSchema } from "./gen/google/rpc/error_details_pb.js";

/** The gRPC status code names, by number (connect's `Code` uses the gRPC numbers). */
const CODE_NAMES: Record<number, string> = {
  0: "OK", 1: "CANCELLED", 2: "UNKNOWN", 3: "INVALID_ARGUMENT", 4: "DEADLINE_EXCEEDED", 5: "NOT_FOUND",
  6: "ALREADY_EXISTS", 7: "PERMISSION_DENIED", 8: "RESOURCE_EXHAUSTED", 9: "FAILED_PRECONDITION",
  10: "ABORTED", 11: "OUT_OF_RANGE", 12: "UNIMPLEMENTED", 13: "INTERNAL", 14: "UNAVAILABLE",
  15: "DATA_LOSS", 16: "UNAUTHENTICATED",
};

export interface FieldViolation {
  /** The request field, e.g. "jobs[0].src_lang". */
  field: string;
  description: string;
}

/** A failed scheduler call. */
export class SchedulerError extends Error {
  /** The gRPC status code (a number; `Code` from @connectrpc/connect names them). */
  readonly code: Code;
  /** The gRPC status code's name, e.g. "NOT_FOUND". */
  readonly codeName: string;
  /** The server's message, without the "[code]" prefix. */
  readonly rawMessage: string;
  /** google.rpc.ErrorInfo reason: a stable, machine-readable cause, when the server sent one. */
  readonly reason: string | undefined;
  /** google.rpc.ErrorInfo domain and metadata. */
  readonly domain: string | undefined;
  readonly errorMetadata: Record<string, string>;
  /** google.rpc.RetryInfo: how long to wait before retrying, when the server said. */
  readonly retryDelayMs: number | undefined;
  /** google.rpc.BadRequest field violations (INVALID_ARGUMENT). */
  readonly fieldViolations: FieldViolation[];
  /** The underlying ConnectError: raw details, response headers and trailers. */
  override readonly cause: ConnectError;

  constructor(err: ConnectError) {
    super(`${CODE_NAMES[err.code] ?? err.code}: ${err.rawMessage}`, { cause: err });
    this.name = new.target.name;
    this.cause = err;
    this.code = err.code;
    this.codeName = CODE_NAMES[err.code] ?? String(err.code);
    this.rawMessage = err.rawMessage;
    const info = err.findDetails(ErrorInfoSchema)[0];
    this.reason = info?.reason || undefined;
    this.domain = info?.domain || undefined;
    this.errorMetadata = { ...(info?.metadata ?? {}) };
    const retry = err.findDetails(RetryInfoSchema)[0]?.retryDelay;
    this.retryDelayMs = retry ? durationMs(retry) : undefined;
    this.fieldViolations = err.findDetails(BadRequestSchema).flatMap((b) =>
      b.fieldViolations.map((v) => ({ field: v.field, description: v.description })));
  }
}

export class CancelledError extends SchedulerError {}
export class UnknownError extends SchedulerError {}
export class InvalidArgumentError extends SchedulerError {}
export class DeadlineExceededError extends SchedulerError {}
export class NotFoundError extends SchedulerError {}
export class AlreadyExistsError extends SchedulerError {}
export class PermissionDeniedError extends SchedulerError {}
export class ResourceExhaustedError extends SchedulerError {}
export class FailedPreconditionError extends SchedulerError {}
export class AbortedError extends SchedulerError {}
export class OutOfRangeError extends SchedulerError {}
export class UnimplementedError extends SchedulerError {}
export class InternalError extends SchedulerError {}
export class UnavailableError extends SchedulerError {}
export class DataLossError extends SchedulerError {}
export class UnauthenticatedError extends SchedulerError {}

const CLASSES: Record<number, new (err: ConnectError) => SchedulerError> = {
  [Code.Canceled]: CancelledError, [Code.Unknown]: UnknownError, [Code.InvalidArgument]: InvalidArgumentError,
  [Code.DeadlineExceeded]: DeadlineExceededError, [Code.NotFound]: NotFoundError,
  [Code.AlreadyExists]: AlreadyExistsError, [Code.PermissionDenied]: PermissionDeniedError,
  [Code.ResourceExhausted]: ResourceExhaustedError, [Code.FailedPrecondition]: FailedPreconditionError,
  [Code.Aborted]: AbortedError, [Code.OutOfRange]: OutOfRangeError, [Code.Unimplemented]: UnimplementedError,
  [Code.Internal]: InternalError, [Code.Unavailable]: UnavailableError, [Code.DataLoss]: DataLossError,
  [Code.Unauthenticated]: UnauthenticatedError,
};

/** The typed error for anything a call threw (an abort becomes CancelledError). */
export function toSchedulerError(err: unknown): SchedulerError {
  if (err instanceof SchedulerError) return err;
  const connect = ConnectError.from(err);
  return new (CLASSES[connect.code] ?? SchedulerError)(connect);
}

/** Runs a call and rethrows its failure as a typed error. */
export async function call<T>(fn: () => Promise<T>): Promise<T> {
  try {
    return await fn();
  } catch (err) {
    throw toSchedulerError(err);
  }
}

// -- errors a node handler throws ------------------------------------------------------------------

/** Options of the errors a handler throws: `code` is the JobError code the scheduler stores. */
export interface HandlerErrorOptions {
  code?: string;
  cause?: unknown;
}

/** Thrown by a node handler: this attempt failed, another may succeed (the job is requeued while
 * attempts remain). JobError.code is `code`, default RETRYABLE_ERROR. Any other error a handler
 * throws is retried the same way, with code HANDLER_EXCEPTION (as in the Python SDK). */
export class RetryableError extends Error {
  readonly code: string;
  constructor(message: string, options: HandlerErrorOptions = {}) {
    super(message, { cause: options.cause });
    this.name = "RetryableError";
    this.code = options.code ?? "RETRYABLE_ERROR";
  }
}

/** Thrown by a node handler: the job cannot succeed; it fails for good, whatever attempts remain.
 * JobError.code is `code`, default FATAL_ERROR. */
export class FatalError extends Error {
  readonly code: string;
  constructor(message: string, options: HandlerErrorOptions = {}) {
    super(message, { cause: options.cause });
    this.name = "FatalError";
    this.code = options.code ?? "FATAL_ERROR";
  }
}

/** Thrown by a node handler: this node cannot serve the job right now (its model is not loaded);
 * the job goes back to its pool for another node (the scheduler records LINGUA_MODEL_UNAVAILABLE). */
export class ModelUnavailableError extends Error {
  constructor(message = "model not available", options: { cause?: unknown } = {}) {
    super(message, { cause: options.cause });
    this.name = "ModelUnavailableError";
  }
}
