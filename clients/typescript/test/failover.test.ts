// Failover to a second server replica: the replica serving an open stream is killed, and the client resumes the
// stream on the other one without losing or repeating an event.

import assert from "node:assert/strict";
import { after, before, test } from "node:test";

import { AgentRunClient, ApprovalDecision, isKind, type RunEvent } from "../src/index.js";
import { script, startStack, type Stack } from "./stack.js";

let stack: Stack;

before(async () => {
  stack = await startStack("failover", 2);
});

after(async () => {
  await stack?.stop();
});

test("a stream whose server is killed resumes on the other replica, every event once", async () => {
  const client = new AgentRunClient(stack.servers);
  try {
    const key = await script(
      stack,
      { chunks: ["Let ", "me ", "check."], tool_calls: [{ name: "echo", arguments: { text: "after failover" } }] },
      { chunks: ["Done ", "after ", "failover."] },
    );
    const runId = await client.startRun("patient", `failover ${key}`);

    const seen: RunEvent[] = [];
    let killed = false;
    for await (const event of client.streamRun(runId)) {
      seen.push(event);
      if (isKind(event, "approvalRequested") && !killed) {
        // The stream is open on the first replica (calls go to the first address first): kill it mid-stream.
        process.kill(stack.serverPids[0], "SIGKILL");
        killed = true;
        await client.approve(runId, event.kind.value.approvalId, ApprovalDecision.APPROVE, { approver: "node" });
      }
    }

    assert.ok(killed);
    // Every sequence number once and in order; only the pending approval request may come again after the resume,
    // with its original sequence number.
    const fresh = new Map<bigint, RunEvent>();
    for (const event of seen) {
      const original = fresh.get(event.sequence);
      if (original === undefined) {
        assert.equal(event.sequence, BigInt(fresh.size + 1), `out of order: ${event.sequence}`);
        fresh.set(event.sequence, event);
      } else {
        assert.ok(isKind(event, "approvalRequested") && isKind(original, "approvalRequested"));
        assert.equal(event.kind.value.approvalId, original.kind.value.approvalId);
      }
    }
    const last = seen.at(-1)!;
    assert.ok(isKind(last, "runCompleted"));
    assert.equal(last.kind.value.output, "Done after failover.");
    assert.equal(client.targets.length, 2);
  } finally {
    client.close();
  }
});
