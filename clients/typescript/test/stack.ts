// The real stack for these tests: `python -m tests.node_stack` from the repository's root starts a Temporal dev
// server, Redis (REDIS_URL, else an embedded Valkey), the offline model, the worker and gRPC servers as processes.
// It stops everything when its stdin closes, which happens when stop() is called or this process dies.

import { spawn, type ChildProcess } from "node:child_process";
import { existsSync, mkdirSync, openSync } from "node:fs";
import { dirname, join, resolve } from "node:path";
import { createServer } from "node:net";
import { createInterface } from "node:readline";
import { fileURLToPath } from "node:url";

// dist/test/stack.js -> the repository's root
export const REPO_ROOT = resolve(dirname(fileURLToPath(import.meta.url)), "..", "..", "..", "..");

export interface Stack {
  servers: string[];
  serverPids: number[];
  workerPids: number[];
  modelUrl: string;
  python: string;
  /** With `auth`, tokens the servers take: "ada" (tenant acme, every right), "reader" (acme, runs:read), "eve". */
  tokens: Record<string, string>;
  stop(): Promise<void>;
}

function python(): string {
  if (process.env.AGENTRUN_PYTHON) {
    return process.env.AGENTRUN_PYTHON;
  }
  const venv = join(REPO_ROOT, ".venv", "bin", "python");
  if (!existsSync(venv)) {
    throw new Error(`no Python environment at ${venv}: run make test (or set AGENTRUN_PYTHON)`);
  }
  return venv;
}

/** Starts the stack; what its processes log goes to dist/test-logs/<name>.log. */
export async function startStack(name: string, replicas = 1, auth = false): Promise<Stack> {
  const logs = join(REPO_ROOT, "clients", "typescript", "dist", "test-logs");
  mkdirSync(logs, { recursive: true });
  const logFile = join(logs, `${name}.log`);
  const log = openSync(logFile, "w");
  const args = ["-m", "tests.node_stack", "--replicas", String(replicas), ...(auth ? ["--auth"] : [])];
  const child = spawn(python(), args, {
    cwd: REPO_ROOT,
    stdio: ["pipe", "pipe", log],
  });
  const exited = new Promise<void>((resolve) => child.once("exit", () => resolve()));
  const ready = await firstJsonLine(child, logFile);
  return {
    servers: ready.servers,
    serverPids: ready.server_pids,
    workerPids: ready.worker_pids,
    modelUrl: ready.model_url,
    python: ready.python,
    tokens: ready.tokens,
    async stop() {
      child.stdin?.end();
      await exited;
    },
  };
}

interface Ready {
  servers: string[];
  server_pids: number[];
  worker_pids: number[];
  model_url: string;
  python: string;
  tokens: Record<string, string>;
}

async function firstJsonLine(child: ChildProcess, logFile: string): Promise<Ready> {
  if (child.stdout === null) {
    throw new Error("the stack's stdout is not a pipe");
  }
  const lines = createInterface({ input: child.stdout });
  for await (const line of lines) {
    // The service processes share this stdout; the stack's own line is the one JSON object with "servers".
    if (line.startsWith('{"servers"')) {
      lines.close();
      child.stdout.resume(); // keep draining what the services print
      return JSON.parse(line) as Ready;
    }
  }
  throw new Error(`the stack exited before it was ready (exit code ${child.exitCode}); see ${logFile}`);
}

/**
 * Registers a script with the offline model and returns its key: a run whose input contains the key gets these
 * replies, one step per model call (see worker/offline_model.py for the steps' fields).
 */
export async function script(stack: Stack, ...steps: object[]): Promise<string> {
  const key = `script-${Math.random().toString(16).slice(2, 14)}`;
  const base = stack.modelUrl.replace(/\/v1\/?$/, "");
  const response = await fetch(`${base}/_offline/scripts`, {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify({ key, steps }),
  });
  if (!response.ok) {
    throw new Error(`the offline model refused the script: ${await response.text()}`);
  }
  return key;
}

/** A port that nothing listens on now. */
export async function freePort(): Promise<number> {
  return await new Promise((resolve) => {
    const server = createServer().listen(0, "127.0.0.1", () => {
      const address = server.address();
      server.close(() => resolve(typeof address === "object" && address !== null ? address.port : 0));
    });
  });
}
