// google.protobuf.Struct as @grpc/proto-loader represents it, to and from
// plain JSON values.
import type { Struct, Struct__Output } from "./generated/google/protobuf/Struct";
import type { Value, Value__Output } from "./generated/google/protobuf/Value";

export type Json = null | boolean | number | string | Json[] | { [key: string]: Json };
export type JsonObject = { [key: string]: Json };

export function toStruct(obj: JsonObject): Struct {
  const fields: Record<string, Value> = {};
  for (const [k, v] of Object.entries(obj)) {
    if (v !== undefined) fields[k] = toValue(v, k);
  }
  return { fields };
}

function toValue(v: unknown, path: string): Value {
  if (v === null) return { nullValue: "NULL_VALUE" };
  switch (typeof v) {
    case "boolean":
      return { boolValue: v };
    case "number":
      if (!Number.isFinite(v)) throw new TypeError(`${path}: ${v} is not a JSON number`);
      return { numberValue: v };
    case "string":
      return { stringValue: v };
    case "object":
      if (Array.isArray(v)) return { listValue: { values: v.map((x, i) => toValue(x ?? null, `${path}[${i}]`)) } };
      if (v instanceof Date) return { stringValue: v.toISOString() };
      return { structValue: toStruct(v as JsonObject) };
    default:
      throw new TypeError(`${path}: a ${typeof v} is not JSON`);
  }
}

export function fromStruct(s: Struct__Output | null | undefined): JsonObject {
  const out: JsonObject = {};
  for (const [k, v] of Object.entries(s?.fields ?? {})) out[k] = fromValue(v);
  return out;
}

const KINDS = ["nullValue", "numberValue", "stringValue", "boolValue", "structValue", "listValue"] as const;

function fromValue(v: Value__Output): Json {
  // Decoded messages name their oneof case in `kind`; a message built here does not.
  const kind = v.kind ?? KINDS.find((k) => v[k] !== undefined);
  switch (kind) {
    case "numberValue":
      return v.numberValue ?? 0;
    case "stringValue":
      return v.stringValue ?? "";
    case "boolValue":
      return v.boolValue ?? false;
    case "structValue":
      return fromStruct(v.structValue);
    case "listValue":
      return (v.listValue?.values ?? []).map(fromValue);
    default:
      return null;
  }
}
