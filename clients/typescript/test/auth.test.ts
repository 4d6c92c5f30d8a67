// A server that authenticates: the client sends its token with every call, streams included; the approver is the
// token's subject; another tenant's run is not found; a missing right or token is refused with its status.

import assert from "node:assert/strict";
import { after, before, test } from "node:test";

import { AgentRunClient, ApprovalDecision, Code, ConnectError, isKind, RunState } from "../src/index.js";
import { script, startStack, type Stack } from "./stack.js";

let stack: Stack;
const clients: AgentRunClient[] = [];

function client(token?: string | (() => string)): AgentRunClient {
  const made = new AgentRunClient(stack.servers, { token, retryBudgetMs: 0 });
  clients.push(made);
  return made;
}

before(async () => {
  stack = await startStack("auth", 1, true);
});

after(async () => {
  for (const made of clients) {
    made.close();
  }
  await stack?.stop();
});

async function refusal(call: Promise<unknown>): Promise<ConnectError> {
  try {
    await call;
  } catch (err) {
    assert.ok(err instanceof ConnectError, String(err));
    return err;
  }
  throw new Error("the call was not refused");
}

test("the token goes with every call and the approver is its subject", async () => {
  let asked = 0;
  const ada = client(() => {
    asked += 1;
    return stack.tokens.ada;
  });
  const key = await script(stack, { tool_calls: [{ name: "echo", arguments: { text: "hi" } }] }, { text: "done" });
  const runId = await ada.startRun("patient", key);
  let approvalId = "";
  for await (const event of ada.streamRun(runId)) {
    if (isKind(event, "approvalRequested")) {
      approvalId = event.kind.value.approvalId;
      break;
    }
  }

  const recorded = await ada.approve(runId, approvalId, ApprovalDecision.APPROVE, { approver: "mallory" });

  assert.equal(recorded.approver, "ada");
  assert.ok(asked >= 3, `the token function was called ${asked} times`);
  const run = await ada.getRun(runId);
  assert.deepEqual(
    run.decidedApprovals.map((decided) => decided.approver),
    ["ada"],
  );

  const eve = await refusal(client(stack.tokens.eve).getRun(runId));
  assert.equal(eve.code, Code.NotFound);
  assert.equal(eve.rawMessage, `run '${runId}' does not exist`);

  const reader = await refusal(client(stack.tokens.reader).cancelRun(runId));
  assert.equal(reader.code, Code.PermissionDenied);
  assert.equal(reader.rawMessage, "'reader' may not call CancelRun: it needs the right 'runs:cancel'");
  assert.notEqual((await client(stack.tokens.reader).getRun(runId)).state, RunState.UNSPECIFIED);

  const nobody = await refusal(client().listRuns());
  assert.equal(nobody.code, Code.Unauthenticated);
  assert.match(nobody.rawMessage, /^the call has no credentials/);
});
