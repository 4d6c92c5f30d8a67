// The approvals-service case: Node approves a tool call of a run that a Python client is streaming at the same time,
// and both see the decision.

import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { after, before, test } from "node:test";

import {
  AgentRunClient,
  ApprovalDecision,
  isKind,
  RunState,
  ToolCallStatus,
  type RunEvent,
} from "../src/index.js";
import { script, startStack, type Stack } from "./stack.js";

let stack: Stack;
let client: AgentRunClient;

before(async () => {
  stack = await startStack("approvals");
  client = new AgentRunClient(stack.servers);
});

after(async () => {
  client?.close();
  await stack?.stop();
});

/** The Python client's CLI following a run: resolves with its output once it exits, and says when it has printed
 * a line that matches. */
function pythonStream(runId: string) {
  const cli = spawn(stack.python, ["-m", "agentrun.cli", "stream", runId, "--server", stack.servers.join(",")], {
    stdio: ["ignore", "pipe", "pipe"],
  });
  let output = "";
  const waiting: { pattern: RegExp; resolve: () => void }[] = [];
  const collect = (chunk: Buffer) => {
    output += chunk.toString();
    for (const wait of waiting.filter((wait) => wait.pattern.test(output))) {
      wait.resolve();
    }
  };
  cli.stdout.on("data", collect);
  cli.stderr.on("data", collect);
  const exited = new Promise<{ code: number | null; output: string }>((resolve) =>
    cli.once("exit", (code) => resolve({ code, output })),
  );
  return {
    exited,
    printed: (pattern: RegExp) =>
      new Promise<void>((resolve, reject) => {
        if (pattern.test(output)) {
          resolve();
          return;
        }
        waiting.push({ pattern, resolve });
        void exited.then(({ output }) => reject(new Error(`the Python client exited without ${pattern}:\n${output}`)));
      }),
  };
}

test("Node approves a tool call of a run that a Python client streams, and both see the decision", async () => {
  const key = await script(
    stack,
    { tool_calls: [{ name: "echo", arguments: { text: "approved from Node" } }] },
    { text: "The tool said so." },
  );
  const runId = await client.startRun("patient", `please echo ${key}`);
  const python = pythonStream(runId);
  await python.printed(/waits for approval/);

  const seen: RunEvent[] = [];
  for await (const event of client.streamRun(runId)) {
    seen.push(event);
    if (isKind(event, "approvalRequested")) {
      const request = event.kind.value;
      assert.equal(request.toolName, "echo");
      const recorded = await client.approve(runId, request.approvalId, ApprovalDecision.APPROVE, {
        approver: "node-approvals",
        reason: "looks fine",
        argumentsSha256: request.argumentsSha256,
      });
      assert.equal(recorded.decision, ApprovalDecision.APPROVE);
      assert.equal(recorded.approver, "node-approvals");
    }
  }

  const decided = seen.find((event) => isKind(event, "approvalDecided"));
  assert.ok(decided && isKind(decided, "approvalDecided"));
  assert.equal(decided.kind.value.decision, ApprovalDecision.APPROVE);
  assert.equal(decided.kind.value.approver, "node-approvals");
  assert.equal(decided.kind.value.reason, "looks fine");
  const finished = seen.find((event) => isKind(event, "toolCallFinished"));
  assert.ok(finished && isKind(finished, "toolCallFinished"));
  assert.equal(finished.kind.value.status, ToolCallStatus.COMPLETED);
  assert.equal(finished.kind.value.result, "approved from Node");
  assert.ok(isKind(seen.at(-1)!, "runCompleted"));

  const { code, output } = await python.exited;
  assert.equal(code, 0, output);
  assert.match(output, /✓ approved by node-approvals: looks fine/);
  assert.match(output, new RegExp(`\\[run ${runId} completed`));

  const run = await client.getRun(runId);
  assert.equal(run.state, RunState.COMPLETED);
  assert.deepEqual(
    run.decidedApprovals.map((approval) => [approval.approver, approval.decision]),
    [["node-approvals", ApprovalDecision.APPROVE]],
  );
});

test("a denial from Node reaches the model, and getRun shows the pending request before it", async () => {
  const key = await script(stack, { tool_calls: [{ name: "echo", arguments: { text: "no" } }] }, { text: "Denied." });
  const runId = await client.startRun("patient", `please echo ${key}`);
  let pendingSeen = false;
  for await (const event of client.streamRun(runId)) {
    if (isKind(event, "approvalRequested")) {
      const run = await client.getRun(runId);
      assert.equal(run.state, RunState.WAITING_FOR_APPROVAL);
      assert.deepEqual(
        run.pendingApprovals.map((pending) => [pending.approvalId, pending.sequence]),
        [[event.kind.value.approvalId, event.sequence]],
      );
      pendingSeen = true;
      await client.approve(runId, event.kind.value.approvalId, ApprovalDecision.DENY, {
        approver: "node-approvals",
        reason: "not today",
      });
    }
    if (isKind(event, "toolCallFinished")) {
      assert.equal(event.kind.value.status, ToolCallStatus.DENIED);
      assert.match(event.kind.value.error, /not today/);
    }
  }
  assert.ok(pendingSeen);
});
