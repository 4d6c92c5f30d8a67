// The TypeScript client library of agentrun: a thin, typed layer over the stubs generated from the contract that
// fails over between server replicas, in the shape of the Python client (clients/python/agentrun/client.py).

import { randomUUID } from "node:crypto";
import { setTimeout as sleep } from "node:timers/promises";

import { create } from "@bufbuild/protobuf";
import {
  Code,
  ConnectError,
  createClient,
  type Client,
  type Interceptor,
  type Transport,
} from "@connectrpc/connect";
import { createGrpcTransport, Http2SessionManager } from "@connectrpc/connect-node";

import {
  AgentService,
  ApprovalDecision,
  ApproveRequestSchema,
  type ApproveResponse,
  type ListRunsResponse,
  type Run,
  type RunCompleted,
  type RunEvent,
  RunEventSchema,
} from "./gen/agentrun/v1/agent_service_pb.js";

/**
 * A server without authentication (loopback dev) takes Approve's approver from this metadata key; one that
 * authenticates records the caller's own identity and ignores it.
 */
export const APPROVER_METADATA = "x-agentrun-approver";
export const RETRY_BUDGET_MS = 60_000;

/** The name of each kind of event, as `event.kind.case` carries it: "textDelta", "approvalRequested", ... */
export type EventKind = NonNullable<RunEvent["kind"]["case"]>;
/** An event known to be of one kind: `event.kind.value` has that kind's type. */
export type EventOf<K extends EventKind> = RunEvent & { kind: Extract<RunEvent["kind"], { case: K }> };

export const TERMINAL_KINDS: ReadonlySet<EventKind> = new Set(["runCompleted", "runFailed", "runCancelled"]);

/** Narrows an event to one kind: `if (isKind(event, "textDelta")) out.write(event.kind.value.text)`. */
export function isKind<K extends EventKind>(event: RunEvent, kind: K): event is EventOf<K> {
  return event.kind.case === kind;
}

/** Whether the event ends its run's stream (run_completed, run_failed or run_cancelled). */
export function isTerminal(event: RunEvent): boolean {
  return event.kind.case !== undefined && TERMINAL_KINDS.has(event.kind.case);
}

/** A run ended without an answer; `event` is its terminal event. */
export class RunEndedError extends Error {
  constructor(
    readonly runId: string,
    readonly event: RunEvent,
  ) {
    let ending: string;
    if (event.kind.case === "runCancelled") {
      ending = event.kind.value.reason ? `was cancelled: ${event.kind.value.reason}` : "was cancelled";
    } else {
      ending = `failed: ${event.kind.case === "runFailed" ? event.kind.value.error : "unknown error"}`;
    }
    super(`run ${runId} ${ending}`);
    this.name = new.target.name;
  }
}

/** A run failed; `event.kind.value.error` says why. */
export class RunFailedError extends RunEndedError {}

/** A run was cancelled; `event.kind.value.reason` says why, when the canceller gave a reason. */
export class RunCancelledError extends RunEndedError {}

export interface AgentRunClientOptions {
  /** How long one call keeps trying addresses that are unavailable before it throws; 60 s by default. */
  retryBudgetMs?: number;
  /** Transports to use instead of plain-text HTTP/2 to each address (for TLS, say); they are not closed by close(). */
  transports?: Transport[];
  /**
   * A bearer token sent with every call as `authorization: Bearer <token>`, or a function that returns the current
   * one (called for every call, so that a program can hand over a token it refreshes). Only for the transports the
   * client makes; given `transports` bring their own interceptors. Outside loopback, use TLS.
   */
  token?: string | (() => string);
  /** `https` makes the client's own transports use TLS (Node's CAs, or NODE_EXTRA_CA_CERTS); `http` by default. */
  scheme?: "http" | "https";
}

const FIRST_BACKOFF_MS = 100;
const MAX_BACKOFF_MS = 2_000;
// Pings find a server whose host vanished without closing the connection, which would otherwise leave an open
// stream waiting forever (the server accepts a ping every 10 s); an idle connection is kept for a minute.
const SESSION_OPTIONS = { pingIntervalMs: 30_000, pingTimeoutMs: 10_000, idleConnectionTimeoutMs: 60_000 };

/** The waits between one call's attempts: exponential backoff with full jitter, within a budget of time. */
class Retries {
  private backoffMs = FIRST_BACKOFF_MS;
  private deadline = 0;

  constructor(private readonly budgetMs: number) {
    this.restart();
  }

  /** The call made progress: the next failure starts again with a short wait and the whole budget. */
  restart(): void {
    this.backoffMs = FIRST_BACKOFF_MS;
    this.deadline = Date.now() + this.budgetMs;
  }

  spent(): boolean {
    return Date.now() >= this.deadline;
  }

  async wait(): Promise<void> {
    const delay = Math.random() * this.backoffMs;
    await sleep(Math.max(0, Math.min(delay, this.deadline - Date.now())));
    this.backoffMs = Math.min(this.backoffMs * 2, MAX_BACKOFF_MS);
  }
}

/**
 * Whether a call failed because the server or the connection went away rather than because the server answered
 * with an error: UNAVAILABLE (nothing listens, or a server that stops ends its calls so), CANCELLED (this client
 * cancels no call it still waits on, so gRPC on the server shed it: a burst of more calls than it queues), or a
 * connection that broke before any status arrived (a server process killed mid-call). Every other status is an
 * answer that another replica would repeat.
 */
export function isConnectionLost(err: unknown): boolean {
  if (!(err instanceof ConnectError)) {
    return false;
  }
  if (err.code === Code.Unavailable || err.code === Code.Canceled) {
    return true;
  }
  // A status the server sent comes with its trailers (grpc-status); a broken connection has none.
  const answered = err.metadata.has("grpc-status");
  return !answered && (err.code === Code.Internal || err.code === Code.Aborted || err.code === Code.Unknown);
}

function addresses(target: string | readonly string[]): string[] {
  const list = (typeof target === "string" ? target.split(",") : [...target]).map((part) => part.trim());
  if (list.length === 0 || list.some((part) => part === "")) {
    throw new Error(`server addresses must not be empty: ${JSON.stringify(target)}`);
  }
  return list;
}

/**
 * Calls agentrun servers: `const client = new AgentRunClient(["10.0.0.1:50051", "10.0.0.2:50051"])`, and
 * `client.close()` when done.
 *
 * `target` is one server address or several replicas: an array, or one string with commas. A call that fails with
 * UNAVAILABLE (or whose connection broke) moves to the next address and tries again, with exponential backoff and
 * jitter between attempts, until `retryBudgetMs` are spent; then it throws the last error. Every other error is
 * thrown at once as a `ConnectError`: `err.code` is the gRPC status (`Code.NotFound`, ...) and `err.rawMessage`
 * the server's message. Each call retries only what is safe to repeat: see the methods.
 */
export class AgentRunClient {
  readonly targets: readonly string[];
  readonly retryBudgetMs: number;
  private readonly sessions: Http2SessionManager[] = [];
  private readonly clients: Client<typeof AgentService>[];
  private current = 0; // the address that answered last: calls go there first

  constructor(target: string | readonly string[] = "localhost:50051", options: AgentRunClientOptions = {}) {
    this.retryBudgetMs = options.retryBudgetMs ?? RETRY_BUDGET_MS;
    let transports = options.transports;
    if (transports === undefined) {
      this.targets = addresses(target);
      const token = options.token;
      const interceptors: Interceptor[] =
        token === undefined
          ? []
          : [
              (next) => async (request) => {
                request.header.set("authorization", `Bearer ${typeof token === "function" ? token() : token}`);
                return await next(request);
              },
            ];
      transports = this.targets.map((address) => {
        const baseUrl = `${options.scheme ?? "http"}://${address}`;
        const sessionManager = new Http2SessionManager(baseUrl, SESSION_OPTIONS);
        this.sessions.push(sessionManager);
        return createGrpcTransport({ baseUrl, sessionManager, interceptors });
      });
    } else {
      this.targets = transports.map((_, index) => `transport ${index}`);
    }
    this.clients = transports.map((transport) => createClient(AgentService, transport));
  }

  /** Closes the connections this client opened; calls still running fail. */
  close(): void {
    for (const session of this.sessions) {
      session.abort();
    }
  }

  /**
   * Starts a run and returns its id.
   *
   * Every start carries a `requestId`, a new one when none is given, so that a retry after an answer lost on the
   * way returns the run the first attempt started instead of starting a second. Give your own to make your own
   * retries safe as well (the same `requestId` always returns the same run).
   */
  async startRun(
    agent: string,
    input: string,
    options: { conversationId?: string; requestId?: string } = {},
  ): Promise<string> {
    const request = {
      agent,
      input,
      conversationId: options.conversationId ?? "",
      requestId: options.requestId || randomUUID().replaceAll("-", ""),
    };
    return (await this.call((client) => client.startRun(request))).runId;
  }

  /**
   * Yields the run's events after `afterSequence`, up to and including its terminal event.
   *
   * When the server or the connection goes away, the stream resumes after the last event it yielded, on the next
   * address, so every event comes once and in order. The retry budget starts again with every event: a stream that
   * makes progress never runs out. After a resume, approval requests that still wait for an answer come again
   * first, with their original (older) sequence numbers; tell them apart by `approvalId`. Breaking out of the loop
   * ends the call.
   */
  async *streamRun(runId: string, options: { afterSequence?: bigint } = {}): AsyncGenerator<RunEvent, void> {
    let afterSequence = options.afterSequence ?? 0n;
    const retries = new Retries(this.retryBudgetMs);
    for (;;) {
      const index = this.current;
      const abort = new AbortController();
      try {
        for await (const response of this.clients[index].streamRun(
          { runId, afterSequence },
          { signal: abort.signal },
        )) {
          const event = response.event;
          if (event === undefined) {
            continue;
          }
          // The repeated approval requests of a resumed stream carry older sequence numbers; resuming from one of
          // those again would repeat the events after it.
          if (event.sequence > afterSequence) {
            afterSequence = event.sequence;
          }
          retries.restart();
          yield event;
          if (isTerminal(event)) {
            return;
          }
        }
        return;
      } catch (err) {
        await this.failOver(index, err, retries);
      } finally {
        // A caller that stops reading early must not leave the server streaming to nobody.
        abort.abort();
      }
    }
  }

  /**
   * Starts a run and waits for its answer.
   *
   * Throws `RunFailedError` or `RunCancelledError` (both `RunEndedError`) when the run ends without one.
   */
  async run(
    agent: string,
    input: string,
    options: { conversationId?: string; requestId?: string } = {},
  ): Promise<RunCompleted> {
    const runId = await this.startRun(agent, input, options);
    let last: RunEvent | undefined;
    for await (const event of this.streamRun(runId)) {
      last = event;
      if (event.kind.case === "runCompleted") {
        return event.kind.value;
      }
    }
    if (last?.kind.case === "runCancelled") {
      throw new RunCancelledError(runId, last);
    }
    if (last?.kind.case === "runFailed") {
      throw new RunFailedError(runId, last);
    }
    const error = "the stream ended without a result";
    throw new RunFailedError(runId, create(RunEventSchema, { kind: { case: "runFailed", value: { error } } }));
  }

  async getRun(runId: string): Promise<Run> {
    const response = await this.call((client) => client.getRun({ runId }));
    if (response.run === undefined) {
      throw new ConnectError("GetRun answered without a run", Code.Internal);
    }
    return response.run;
  }

  /** Asks the run to stop; retried like every call, since cancelling a cancelled run is no error. */
  async cancelRun(runId: string, options: { reason?: string } = {}): Promise<void> {
    await this.call((client) => client.cancelRun({ runId, reason: options.reason ?? "" }));
  }

  async listRuns(options: { pageSize?: number; pageToken?: string } = {}): Promise<ListRunsResponse> {
    const request = { pageSize: options.pageSize ?? 0, pageToken: options.pageToken ?? "" };
    return await this.call((client) => client.listRuns(request));
  }

  /**
   * Answers a pending approval and returns the decision the run recorded.
   *
   * A server that authenticates records the caller (the token's subject) as the approver; `approver` is the name a
   * server without authentication records instead.
   *
   * Pass the request's `argumentsSha256` to make sure the decision applies to exactly the arguments shown. A retry
   * is safe: deciding again with the same decision is answered with the recorded one.
   */
  async approve(
    runId: string,
    approvalId: string,
    decision: ApprovalDecision,
    options: { approver?: string; reason?: string; argumentsSha256?: string } = {},
  ): Promise<ApproveResponse> {
    const request = create(ApproveRequestSchema, {
      runId,
      approvalId,
      decision,
      reason: options.reason ?? "",
      argumentsSha256: options.argumentsSha256 ?? "",
    });
    const headers: Record<string, string> = options.approver ? { [APPROVER_METADATA]: options.approver } : {};
    return await this.call((client) => client.approve(request, { headers }));
  }

  /**
   * Makes a unary call with failover. Only for calls that are safe to repeat: an attempt that failed may have
   * reached a server that did the work and died before it answered.
   */
  private async call<T>(call: (client: Client<typeof AgentService>) => Promise<T>): Promise<T> {
    const retries = new Retries(this.retryBudgetMs);
    for (;;) {
      const index = this.current;
      try {
        return await call(this.clients[index]);
      } catch (err) {
        await this.failOver(index, err, retries);
      }
    }
  }

  /**
   * Moves on from the address at `index` and waits before the next attempt, or throws `err` when the server
   * answered it or the budget is spent.
   */
  private async failOver(index: number, err: unknown, retries: Retries): Promise<void> {
    if (!isConnectionLost(err) || retries.spent()) {
      throw err;
    }
    // Calls that fail at the same address together move on once, not once each: with two addresses, a second move
    // would lead back to the one that failed.
    if (index === this.current) {
      this.current = (index + 1) % this.clients.length;
    }
    await retries.wait();
  }
}
