// UNAVAILABLE as an answer of the server rather than a lost connection: Approve when no worker takes the decision.

import assert from "node:assert/strict";
import { after, before, test } from "node:test";

import { AgentRunClient, ApprovalDecision, Code, ConnectError, isConnectionLost, isKind } from "../src/index.js";
import { script, startStack, type Stack } from "./stack.js";

let stack: Stack;

before(async () => {
  stack = await startStack("unavailable");
});

after(async () => {
  await stack?.stop();
});

test("Approve with no worker up answers UNAVAILABLE, saying the decision may still take effect", async () => {
  // No retries: the first answer is the one under test.
  const client = new AgentRunClient(stack.servers, { retryBudgetMs: 0 });
  try {
    const key = await script(stack, { tool_calls: [{ name: "echo", arguments: { text: "x" } }] }, { text: "ok" });
    const runId = await client.startRun("patient", `echo ${key}`);
    let approvalId = "";
    for await (const event of client.streamRun(runId)) {
      if (isKind(event, "approvalRequested")) {
        approvalId = event.kind.value.approvalId;
        break;
      }
    }
    process.kill(stack.workerPids[0], "SIGKILL");

    await assert.rejects(
      client.approve(runId, approvalId, ApprovalDecision.APPROVE, { approver: "node" }),
      (err: unknown) => {
        assert.ok(err instanceof ConnectError);
        assert.equal(Code[err.code], Code[Code.Unavailable]);
        assert.match(err.rawMessage, /no worker took the decision .* send the same decision again/);
        assert.ok(isConnectionLost(err)); // UNAVAILABLE is retried, on another replica when there is one
        return true;
      },
    );
  } finally {
    client.close();
  }
});
