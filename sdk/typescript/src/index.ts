// @lingua/scheduler-sdk: a typed client and a node runtime for the Lingua Scheduler.
export {
  Client, type CallOptions, type ClientOptions, type JobEventView, type JobView, type ListJobsFilter, type SubmitResultView,
} from "./client.js";
export { Node, type Assignment, type Handler, type NodeEvents, type NodeOptions } from "./node.js";
export {
  isTerminal, jsonable, stateName, type StateName, type WithStateName, type JobResultInput, type JobSpecInput, type PairInput,
} from "./convert.js";
export * from "./errors.js";
export { SDK_VERSION } from "./version.js";
export type { ConnectionOptions, TlsOptions } from "./transport.js";
// The generated messages and the service descriptor, for what the wrappers do not cover.
export * from "./gen/lingua/scheduler/v1/scheduler_pb.js";
