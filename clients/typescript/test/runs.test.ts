// Runs from Node against the real stack: stream to the end, resume from the middle, run and wait, get, list, cancel.

import assert from "node:assert/strict";
import { after, before, test } from "node:test";

import {
  AgentRunClient,
  isKind,
  RunCancelledError,
  RunFailedError,
  RunState,
  type RunEvent,
} from "../src/index.js";
import { script, startStack, type Stack } from "./stack.js";

let stack: Stack;
let client: AgentRunClient;

before(async () => {
  stack = await startStack("runs");
  client = new AgentRunClient(stack.servers);
});

after(async () => {
  client?.close();
  await stack?.stop();
});

async function collect(events: AsyncIterable<RunEvent>): Promise<RunEvent[]> {
  const all: RunEvent[] = [];
  for await (const event of events) {
    all.push(event);
  }
  return all;
}

function text(events: RunEvent[]): string {
  return events.map((event) => (isKind(event, "textDelta") ? event.kind.value.text : "")).join("");
}

test("a run streams to its terminal event, every sequence once and in order", async () => {
  const key = await script(stack, { chunks: ["one ", "two ", "three ", "four ", "five"], delay_ms: 30 });
  const runId = await client.startRun("assistant", `count ${key}`);

  const events = await collect(client.streamRun(runId));

  assert.deepEqual(
    events.map((event) => event.sequence),
    events.map((_, index) => BigInt(index + 1)),
  );
  assert.equal(text(events), "one two three four five");
  const last = events.at(-1)!;
  assert.ok(isKind(last, "runCompleted"));
  assert.equal(last.kind.value.output, "one two three four five");
  assert.ok(last.kind.value.usage!.totalTokens > 0n);
});

test("a stream resumed from a middle sequence sends exactly the events after it", async () => {
  const key = await script(stack, { chunks: ["a ", "b ", "c ", "d ", "e ", "f"], delay_ms: 30 });
  const runId = await client.startRun("assistant", `letters ${key}`);
  const all = await collect(client.streamRun(runId));
  assert.ok(all.length >= 3, `too few events to resume in the middle: ${all.length}`);
  const middle = all[Math.floor(all.length / 2)].sequence;

  const rest = await collect(client.streamRun(runId, { afterSequence: middle }));

  assert.deepEqual(rest, all.filter((event) => event.sequence > middle));
});

test("run() waits for the answer, and getRun and listRuns show the run", async () => {
  const answer = await client.run("assistant", "Hello from Node", { requestId: "node-run-and-wait" });
  assert.match(answer.output, /Hello from Node/);

  // The same requestId is the same run.
  const runId = await client.startRun("assistant", "Hello from Node", { requestId: "node-run-and-wait" });
  const run = await client.getRun(runId);
  assert.equal(run.state, RunState.COMPLETED);
  assert.equal(run.output, answer.output);
  assert.equal(run.agent, "assistant");

  const page = await client.listRuns({ pageSize: 100 });
  assert.ok(page.runs.some((listed) => listed.runId === runId));
});

test("cancelRun ends the stream with run_cancelled, and run() reports it as RunCancelledError", async () => {
  // The run waits for an approval that never comes.
  const key = await script(stack, { tool_calls: [{ name: "echo", arguments: { text: "hi" } }] }, { text: "done" });
  const runId = await client.startRun("patient", `wait ${key}`);
  for await (const event of client.streamRun(runId)) {
    if (isKind(event, "approvalRequested")) {
      break;
    }
  }
  await client.cancelRun(runId, { reason: "changed my mind" });
  await client.cancelRun(runId, { reason: "changed my mind" }); // cancelling twice is no error

  const events = await collect(client.streamRun(runId));

  const last = events.at(-1)!;
  assert.ok(isKind(last, "runCancelled"));
  assert.equal(last.kind.value.reason, "changed my mind");
  assert.equal((await client.getRun(runId)).state, RunState.CANCELLED);
});

test("run() throws RunFailedError with the terminal event when the run fails", async () => {
  const key = await script(stack, { error: { status: 400, message: "bad request from the model" } });

  const failure = await client.run("assistant", `fail ${key}`).then(
    () => assert.fail("the run did not fail"),
    (err: unknown) => err,
  );

  assert.ok(failure instanceof RunFailedError);
  assert.ok(isKind(failure.event, "runFailed"));
  assert.match(failure.event.kind.value.error, /bad request from the model/);
  assert.ok(!(failure instanceof RunCancelledError));
});
