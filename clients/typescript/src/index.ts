// The public surface: the client library, and every message, enum and the service of the contract.
export * from "./client.js";
export * from "./gen/agentrun/v1/agent_service_pb.js";
export { Code, ConnectError } from "@connectrpc/connect";
