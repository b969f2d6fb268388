// Unit checks of the JSON <-> google.protobuf.Struct mapping (the system
// tests in clients/python/tests run the worker against real servers).
import { test } from "node:test";
import * as assert from "node:assert/strict";
import { fromStruct, toStruct } from "../src/struct";
import { Worker } from "../src/worker";

test("JSON survives a round trip through Struct", () => {
  const v = { a: 1, b: "x", c: true, d: null, e: [1, "y", { f: [] }], g: { h: { i: 2.5 } } };
  assert.deepEqual(fromStruct(toStruct(v) as Parameters<typeof fromStruct>[0]), v);
});

test("values that are not JSON are refused", () => {
  assert.throws(() => toStruct({ n: NaN }), /not a JSON number/);
  assert.throws(() => toStruct({ f: (() => 1) as never }), /not JSON/);
});

test("kinds and options are checked when given", () => {
  const w = new Worker({ url: "127.0.0.1:1", token: "t" });
  assert.throws(() => w.handle("Bad Kind", async () => ({})), /must be 1..=128 characters/);
  w.handle("ok.kind", async () => ({}));
  assert.throws(() => w.handle("ok.kind", async () => ({})), /already registered/);
  assert.throws(() => new Worker({ url: "127.0.0.1:1", token: "" }), /token is required/);
  assert.throws(() => new Worker({ url: "127.0.0.1:1", token: "t", claimWaitMs: 60000 }), /claimWaitMs/);
});
