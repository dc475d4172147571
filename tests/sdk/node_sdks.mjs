// Drives a real Node SDK against Meridian as its users do: a client with the write key and the
// host, COUNT track calls (each with its own messageId), an identify, a flush. Prints the
// messageIds it sent as JSON. Run by tests/sdk_e2e.rs:
//   node node_sdks.mjs segment|rudder <base url> <write key> <run id> <count>
import { createRequire } from "node:module";

const require = createRequire(import.meta.url);
const [sdk, baseUrl, writeKey, run, countText] = process.argv.slice(2);
const count = Number(countText);
const ids = Array.from({ length: count }, (_, seq) => `${run}-${seq}`);
const identifyId = `${run}-identify`;

async function segment() {
  const { Analytics } = require("@segment/analytics-node");
  const analytics = new Analytics({ writeKey, host: baseUrl, flushAt: 10, maxRetries: 5 });
  const failures = [];
  analytics.on("error", (error) => failures.push(String(error && error.reason || error)));
  ids.forEach((messageId, seq) =>
    analytics.track({ userId: "node-user", event: "Node Event", messageId, properties: { run, seq } }));
  analytics.identify({ userId: "node-user", messageId: identifyId, traits: { plan: "pro" } });
  await analytics.closeAndFlush({ timeout: 30_000 });
  if (failures.length) throw new Error("segment analytics-node reported: " + failures.join("; "));
}

async function rudder() {
  const Analytics = require("@rudderstack/rudder-sdk-node");
  const analytics = new Analytics(writeKey, { dataPlaneUrl: baseUrl, flushAt: 10, retryCount: 5 });
  const failures = [];
  const callback = (error) => { if (error) failures.push(String(error)); };
  ids.forEach((messageId, seq) =>
    analytics.track({ userId: "node-user", event: "Node Event", messageId, properties: { run, seq } }, callback));
  analytics.identify({ userId: "node-user", messageId: identifyId, traits: { plan: "pro" } }, callback);
  await new Promise((resolve, reject) => analytics.flush((error) => (error ? reject(error) : resolve())));
  if (failures.length) throw new Error("rudder-sdk-node reported: " + failures.join("; "));
}

const drivers = { segment, rudder };
if (!drivers[sdk]) throw new Error(`unknown sdk ${sdk}`);
await drivers[sdk]();
console.log(JSON.stringify({ sdk: `${sdk}-node`, message_ids: [...ids, identifyId] }));
