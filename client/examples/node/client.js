#!/usr/bin/env node
// pairdots from Node.js: @grpc/grpc-js + @grpc/proto-loader, loading the committed .proto
// files at run time (protos/ and the include tree protos/third_party/; nothing generated).
//
//   npm ci
//   node client.js --address localhost:50051 --model minilm-sst2 --text "i loved it !"
//   PAIRDOTS_TOKEN=... node client.js ...     # bearer token when the server requires one
//
// Prints one JSON object: the server's health (grpc.health.v1.Health/Check, from the
// committed protos/third_party/grpc/health/v1/health.proto), the served models' resource
// names, GetModel of "models/<model>", the Explain answer, and the error a bad request gets
// (gRPC code, message and the google.rpc.Status details decoded from the
// grpc-status-details-bin trailer).
"use strict";

const path = require("node:path");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");

const PROTOS = process.env.PAIRDOTS_PROTOS || path.resolve(__dirname, "..", "..", "..", "protos");
const LOADER_OPTIONS = {
  keepCase: false, // lowerCamelCase field names, as in proto3 JSON
  longs: String, // int64 as strings, as in proto3 JSON
  enums: String,
  defaults: true,
  oneofs: true,
  includeDirs: [PROTOS, path.join(PROTOS, "third_party")],
};

function parseArgs(argv) {
  const args = { address: "localhost:50051", model: "", text: "i loved it !", topWords: 2 };
  for (let i = 0; i < argv.length; i += 2) {
    const key = argv[i].replace(/^--/, "").replace(/-([a-z])/g, (_, c) => c.toUpperCase());
    if (!(key in args)) throw new Error(`unknown flag ${argv[i]}`);
    args[key] = key === "topWords" ? Number(argv[i + 1]) : argv[i + 1];
  }
  return args;
}

function unary(client, method, request, metadata) {
  return new Promise((resolve, reject) => {
    client[method](request, metadata, { deadline: Date.now() + 300_000 }, (err, resp) =>
      err ? reject(err) : resolve(resp),
    );
  });
}

// google.rpc.Status from the trailer, with its Any details unpacked by type name.
function statusDetails(err, root) {
  const raw = err.metadata && err.metadata.get("grpc-status-details-bin")[0];
  if (!raw) return [];
  const Status = root.lookupType("google.rpc.Status");
  const status = Status.decode(raw);
  return status.details.map((any) => {
    const typeName = any.type_url.split("/").pop();
    const type = root.lookupType(typeName);
    return { "@type": typeName, ...type.toObject(type.decode(any.value), { longs: String }) };
  });
}

async function main() {
  const args = parseArgs(process.argv.slice(2));
  const files = [
    "pairdots/v1/pairdots.proto",
    "google/rpc/error_details.proto",
    "grpc/health/v1/health.proto",
  ];
  const definition = protoLoader.loadSync(files, LOADER_OPTIONS);
  const api = grpc.loadPackageDefinition(definition);
  // The same files as protobufjs types, to decode error details.
  const protobuf = require("protobufjs");
  const root = new protobuf.Root();
  root.resolvePath = (_origin, target) =>
    LOADER_OPTIONS.includeDirs.map((d) => path.join(d, target)).find((p) => require("node:fs").existsSync(p)) || target;
  root.loadSync(["google/rpc/status.proto", "google/rpc/error_details.proto"]);

  const client = new api.pairdots.v1.PairdotsService(args.address, grpc.credentials.createInsecure());
  const metadata = new grpc.Metadata();
  if (process.env.PAIRDOTS_TOKEN) metadata.set("authorization", `Bearer ${process.env.PAIRDOTS_TOKEN}`);

  // Standard gRPC health checking: "" is the whole server.
  const health = new api.grpc.health.v1.Health(args.address, grpc.credentials.createInsecure());
  const serving = await unary(health, "check", { service: "" }, metadata);
  health.close();

  const models = [];
  let pageToken = "";
  do {
    const page = await unary(client, "listModels", { pageToken }, metadata);
    models.push(...page.models);
    pageToken = page.nextPageToken;
  } while (pageToken);
  // Model.name is the resource name "models/<id>"; requests take it or the bare id.
  const model = args.model || models[0].name.replace(/^models\//, "");
  // GetModel returns the Model resource itself.
  const got = await unary(client, "getModel", { name: `models/${model}` }, metadata);
  const explain = await unary(
    client, "explain", { model, text: args.text, topWords: args.topWords }, metadata,
  );
  let error = null;
  try {
    await unary(client, "explain", { model, text: "   " }, metadata);
  } catch (err) {
    error = { code: err.code, codeName: grpc.status[err.code], message: err.details, details: statusDetails(err, root) };
  }
  client.close();
  process.stdout.write(JSON.stringify({ health: serving.status, models: models.map((m) => m.name), model: got, explain, error }) + "\n");
}

main().catch((err) => {
  process.stderr.write(`pairdots node example failed: ${err.code !== undefined ? grpc.status[err.code] + ": " : ""}${err.details || err.message}\n`);
  process.exit(1);
});
