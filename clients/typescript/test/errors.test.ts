// Every status code the contract documents, as a Node caller sees it: the code, and a message naming the field.

import assert from "node:assert/strict";
import { after, before, test } from "node:test";

import { createClient } from "@connectrpc/connect";
import { createGrpcTransport, Http2SessionManager } from "@connectrpc/connect-node";

import {
  AgentRunClient,
  AgentService,
  ApprovalDecision,
  Code,
  ConnectError,
  isConnectionLost,
  isKind,
  type ApprovalRequested,
} from "../src/index.js";
import { freePort, script, startStack, type Stack } from "./stack.js";

let stack: Stack;
let client: AgentRunClient;

before(async () => {
  stack = await startStack("errors");
  client = new AgentRunClient(stack.servers);
});

after(async () => {
  client?.close();
  await stack?.stop();
});

/** Asserts that `call` fails with `code` and a message that matches `message`. */
async function fails(call: Promise<unknown>, code: Code, message: RegExp): Promise<void> {
  await assert.rejects(call, (err: unknown) => {
    assert.ok(err instanceof ConnectError, `not a ConnectError: ${String(err)}`);
    assert.equal(Code[err.code], Code[code], err.message);
    assert.match(err.rawMessage, message);
    assert.ok(!isConnectionLost(err), "an answer of the server taken for a lost connection");
    return true;
  });
}

async function drain(runId: string, afterSequence = 0n): Promise<void> {
  for await (const _ of client.streamRun(runId, { afterSequence })) {
    // read to the end
  }
}

/** Starts a run of the "patient" agent and returns it once it waits for approval of an echo call. */
async function waitingForApproval(options: { conversationId?: string } = {}) {
  const key = await script(stack, { tool_calls: [{ name: "echo", arguments: { text: "x" } }] }, { text: "ok" });
  const runId = await client.startRun("patient", `echo ${key}`, options);
  for await (const event of client.streamRun(runId)) {
    if (isKind(event, "approvalRequested")) {
      return { runId, request: event.kind.value as ApprovalRequested };
    }
  }
  throw new Error("the run ended without asking for approval");
}

test("INVALID_ARGUMENT names the field", async () => {
  await fails(client.startRun("assistant", "   "), Code.InvalidArgument, /^input: must not be empty/);
  await fails(client.startRun("", "hi"), Code.InvalidArgument, /^agent: /);
  await fails(client.startRun("assistant", "x".repeat((256 << 10) + 1)), Code.InvalidArgument, /^input: .*262144 bytes/);
  await fails(client.startRun("assistant", "hi", { conversationId: "has space" }), Code.InvalidArgument, /^conversation_id: /);
  await fails(client.startRun("assistant", "hi", { requestId: "r".repeat(129) }), Code.InvalidArgument, /^request_id: .*128/);
  await fails(client.getRun(""), Code.InvalidArgument, /^run_id: must not be empty/);
  await fails(drain("run-x", -1n), Code.InvalidArgument, /^after_sequence: /);
  await fails(client.listRuns({ pageSize: 1001 }), Code.InvalidArgument, /^page_size: /);
  await fails(client.listRuns({ pageToken: "not a token" }), Code.InvalidArgument, /^page_token: /);
  await fails(client.cancelRun("run-x", { reason: "r".repeat(2001) }), Code.InvalidArgument, /^reason: .*2000/);
  await fails(
    client.approve("run-x", "a-1", ApprovalDecision.UNSPECIFIED, { approver: "me" }),
    Code.InvalidArgument,
    /^decision: /,
  );
  await fails(
    client.approve("run-x", "a-1", ApprovalDecision.APPROVE, { approver: "me", argumentsSha256: "abc" }),
    Code.InvalidArgument,
    /^arguments_sha256: /,
  );
});

test("RESOURCE_EXHAUSTED for a message over 4 MiB", async () => {
  await fails(client.startRun("assistant", "x".repeat(5 << 20)), Code.ResourceExhausted, /.+/);
});

test("NOT_FOUND for an unknown agent, run or approval", async () => {
  await fails(client.startRun("no-such-agent", "hi"), Code.NotFound, /agent 'no-such-agent'/);
  await fails(client.getRun("run-unknown"), Code.NotFound, /run 'run-unknown' does not exist/);
  await fails(drain("run-unknown"), Code.NotFound, /run 'run-unknown' does not exist/);
  await fails(client.cancelRun("run-unknown"), Code.NotFound, /run 'run-unknown'/);
  const { runId } = await waitingForApproval();
  await fails(
    client.approve(runId, "no-such-approval", ApprovalDecision.APPROVE, { approver: "me" }),
    Code.NotFound,
    /approval 'no-such-approval' does not exist/,
  );
  await client.cancelRun(runId);
});

test("UNAUTHENTICATED for Approve without the approver's identity", async () => {
  const { runId, request } = await waitingForApproval();
  await fails(
    client.approve(runId, request.approvalId, ApprovalDecision.APPROVE, { approver: "" }),
    Code.Unauthenticated,
    /x-agentrun-approver/,
  );
  await client.cancelRun(runId);
});

test("FAILED_PRECONDITION: conversation busy, approval decided otherwise or for other arguments, run ended", async () => {
  const { runId, request } = await waitingForApproval({ conversationId: "node-busy" });
  await fails(
    client.startRun("assistant", "me too", { conversationId: "node-busy" }),
    Code.FailedPrecondition,
    new RegExp(`conversation 'node-busy' already has an active run '${runId}'`),
  );

  await fails(
    client.approve(runId, request.approvalId, ApprovalDecision.APPROVE, { approver: "me", argumentsSha256: "0".repeat(64) }),
    Code.FailedPrecondition,
    /arguments/,
  );
  const first = await client.approve(runId, request.approvalId, ApprovalDecision.APPROVE, { approver: "me" });
  // The same decision again is answered with the one recorded, even by someone else.
  const again = await client.approve(runId, request.approvalId, ApprovalDecision.APPROVE, { approver: "other" });
  assert.deepEqual([again.decision, again.approver], [first.decision, "me"]);
  await fails(
    client.approve(runId, request.approvalId, ApprovalDecision.DENY, { approver: "me" }),
    Code.FailedPrecondition,
    /already decided/,
  );

  await drain(runId);
  await fails(client.cancelRun(runId), Code.FailedPrecondition, /has already ended \(RUN_STATE_COMPLETED\)/);

  const cancelled = await waitingForApproval();
  await client.cancelRun(cancelled.runId);
  await drain(cancelled.runId);
  await fails(
    client.approve(cancelled.runId, cancelled.request.approvalId, ApprovalDecision.APPROVE, { approver: "me" }),
    Code.FailedPrecondition,
    /has already ended/,
  );
});

test("UNAVAILABLE when no server answers, once the retry budget is spent", async () => {
  const port = await freePort();
  const nowhere = new AgentRunClient(`127.0.0.1:${port}`, { retryBudgetMs: 300 });
  try {
    await assert.rejects(nowhere.getRun("run-x"), (err: unknown) => {
      assert.ok(err instanceof ConnectError);
      assert.equal(Code[err.code], Code[Code.Unavailable]);
      return true;
    });
  } finally {
    nowhere.close();
  }
});

test("the generated stubs alone reach the service (no client library)", async () => {
  const baseUrl = `http://${stack.servers[0]}`;
  const sessionManager = new Http2SessionManager(baseUrl);
  const raw = createClient(AgentService, createGrpcTransport({ baseUrl, sessionManager }));
  try {
    await assert.rejects(raw.getRun({ runId: "run-unknown" }), (err: unknown) => {
      assert.ok(err instanceof ConnectError);
      assert.equal(Code[err.code], Code[Code.NotFound]);
      return true;
    });
  } finally {
    sessionManager.abort();
  }
});
