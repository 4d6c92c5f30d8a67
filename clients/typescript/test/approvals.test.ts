// The approvals-service case: Node approves a tool call of a run that a Python client is streaming at the same time,
// and both see the decision.

import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { once } from "node:events";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { after, before, test } from "node:test";

import {
  AgentRunClient,
  ApprovalDecision,
  isKind,
  RunState,
  ToolCallStatus,
  type RunEvent,
} from "../src/index.js";
import { freePort, script, startStack, type Stack } from "./stack.js";

// dist/test -> dist/examples
const EXAMPLES = join(dirname(fileURLToPath(import.meta.url)), "..", "examples");

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

/** A process following a run: `exited` resolves with its output once it exits, and `printed` when it has printed
 * something that matches. */
function follower(command: string, args: string[]) {
  const cli = spawn(command, args, {
    stdio: ["ignore", "pipe", "pipe"],
    env: { ...process.env, AGENTRUN_SERVER: stack.servers.join(",") },
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
        void exited.then(({ output }) => reject(new Error(`${command} exited without ${pattern}:\n${output}`)));
      }),
  };
}

/** The Python client's CLI following a run. */
function pythonStream(runId: string) {
  return follower(stack.python, ["-m", "agentrun.cli", "stream", runId]);
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

test("the README's examples: Python and Node follow one run, and the approvals service decides it", async () => {
  const key = await script(stack, { tool_calls: [{ name: "echo", arguments: { text: "hi" } }] }, { text: "Said hi." });
  const runId = await client.startRun("patient", `say hi ${key}`);
  const python = pythonStream(runId);
  const node = follower(process.execPath, [join(EXAMPLES, "follow.js"), runId]);
  await Promise.all([python.printed(/waits for approval/), node.printed(/waits for approval/)]);
  const [request] = (await client.getRun(runId)).pendingApprovals;

  const port = await freePort();
  const service = spawn(process.execPath, [join(EXAMPLES, "approvals-service.js")], {
    stdio: ["ignore", "pipe", "inherit"],
    env: { ...process.env, AGENTRUN_SERVER: stack.servers.join(","), PORT: String(port) },
  });
  try {
    await once(service.stdout, "data"); // "approvals service listening"
    const decide = (approve: boolean) =>
      fetch(`http://127.0.0.1:${port}/decisions`, {
        method: "POST",
        body: JSON.stringify({ runId, approvalId: request.approvalId, approve, user: "ada", reason: "fine by me" }),
      });
    const response = await decide(true);
    assert.equal(response.status, 200);
    assert.deepEqual(await response.json(), { decision: "APPROVE", approver: "ada" });
    assert.equal((await decide(false)).status, 409); // decided otherwise already: FAILED_PRECONDITION
  } finally {
    service.kill();
  }

  for (const { code, output } of [await python.exited, await node.exited]) {
    assert.equal(code, 0, output);
    assert.match(output, /✓ approved by ada/);
    assert.match(output, /completed/);
  }
});
