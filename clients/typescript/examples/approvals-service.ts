// An approvals service: the backend behind an "allow" / "deny" button in a chat or a ticket. It takes the person's
// click over HTTP and answers the run's approval request, as that person.
//
//   POST /decisions {"runId": "...", "approvalId": "...", "approve": true, "user": "ada", "reason": "...",
//                    "argumentsSha256": "..."}   (argumentsSha256: the one the person was shown; optional)
//
// Usage: PORT=8080 node dist/examples/approvals-service.js   (servers in AGENTRUN_SERVER, comma-separated)

import { createServer } from "node:http";

import { AgentRunClient, ApprovalDecision, Code, ConnectError } from "../src/index.js";

const agentrun = new AgentRunClient(process.env.AGENTRUN_SERVER ?? "127.0.0.1:50051");

// What the HTTP caller hears for each answer of agentrun that is not OK.
const HTTP_STATUS: Partial<Record<Code, number>> = {
  [Code.InvalidArgument]: 400,
  [Code.Unauthenticated]: 401,
  [Code.NotFound]: 404,
  [Code.FailedPrecondition]: 409, // decided otherwise already, other arguments, or the run has ended
};

interface Decision {
  runId: string;
  approvalId: string;
  approve: boolean;
  user: string;
  reason?: string;
  argumentsSha256?: string;
}

const server = createServer(async (request, response) => {
  if (request.method !== "POST" || request.url !== "/decisions") {
    response.writeHead(404).end();
    return;
  }
  try {
    let body = "";
    for await (const chunk of request) {
      body += chunk;
    }
    const decision = JSON.parse(body) as Decision;
    // Retried across replicas; deciding twice the same way answers with the decision recorded.
    const recorded = await agentrun.approve(
      decision.runId,
      decision.approvalId,
      decision.approve ? ApprovalDecision.APPROVE : ApprovalDecision.DENY,
      { approver: decision.user, reason: decision.reason, argumentsSha256: decision.argumentsSha256 },
    );
    response.writeHead(200, { "content-type": "application/json" });
    response.end(JSON.stringify({ decision: ApprovalDecision[recorded.decision], approver: recorded.approver }));
  } catch (err) {
    const status = err instanceof ConnectError ? (HTTP_STATUS[err.code] ?? 503) : 400;
    response.writeHead(status, { "content-type": "text/plain" }).end(err instanceof Error ? err.message : "");
  }
});
server.listen(Number(process.env.PORT ?? 8080), "127.0.0.1", () => console.log("approvals service listening"));
process.once("SIGTERM", () => {
  server.close();
  agentrun.close();
});
