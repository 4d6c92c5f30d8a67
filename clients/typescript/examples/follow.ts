// Follows a run from Node: prints its text as it streams, its tool calls and approvals, and how it ended.
// Usage: node dist/examples/follow.js RUN_ID [--after SEQUENCE]   (servers in AGENTRUN_SERVER, comma-separated)

import { AgentRunClient, ApprovalDecision } from "../src/index.js";

const [runId, flag, after] = process.argv.slice(2);
if (!runId || (flag !== undefined && flag !== "--after")) {
  console.error("usage: follow.js RUN_ID [--after SEQUENCE]");
  process.exit(2);
}
const client = new AgentRunClient(process.env.AGENTRUN_SERVER ?? "127.0.0.1:50051");
try {
  for await (const event of client.streamRun(runId, { afterSequence: BigInt(after ?? 0) })) {
    const { kind } = event;
    switch (kind.case) {
      case "textDelta":
        process.stdout.write(kind.value.text);
        break;
      case "toolCallStarted":
        console.log(`\n→ ${kind.value.toolName}(${kind.value.arguments})`);
        break;
      case "approvalRequested":
        console.log(`⏸ ${kind.value.toolName} waits for approval ${kind.value.approvalId}`);
        break;
      case "approvalDecided":
        console.log(`${kind.value.decision === ApprovalDecision.APPROVE ? "✓ approved" : "⊘ denied"} by ${kind.value.approver}`);
        break;
      case "runCompleted":
        console.log(`\n[completed: ${kind.value.usage?.totalTokens ?? 0n} tokens]`);
        break;
      case "runFailed":
        console.log(`\n[failed: ${kind.value.error}]`);
        process.exitCode = 1;
        break;
      case "runCancelled":
        console.log(`\n[cancelled: ${kind.value.reason}]`);
        process.exitCode = 1;
        break;
    }
  }
} finally {
  client.close();
}
