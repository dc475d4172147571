"""Drives a real Python SDK against Meridian as its users do: the module's write key and host,
COUNT track calls (each with its own message_id), an identify, a flush. Prints the messageIds it
sent as JSON. Run by tests/sdk_e2e.rs:
    python3 python_sdks.py segment|rudder <base url> <write key> <run id> <count>
"""

import json
import sys

sdk, base_url, write_key, run, count = sys.argv[1:6]
ids = [f"{run}-{seq}" for seq in range(int(count))]
identify_id = f"{run}-identify"
failures = []


def on_error(error, batch):
    failures.append(f"{error} ({len(batch)} messages)")


if sdk == "segment":
    import segment.analytics as analytics

    analytics.write_key = write_key
    analytics.host = base_url
elif sdk == "rudder":
    import rudderstack.analytics as analytics

    analytics.write_key = write_key
    analytics.dataPlaneUrl = base_url
else:
    raise SystemExit(f"unknown sdk {sdk}")

analytics.on_error = on_error
analytics.max_retries = 5
for seq, message_id in enumerate(ids):
    analytics.track("python-user", "Python Event", {"run": run, "seq": seq}, message_id=message_id)
analytics.identify("python-user", {"plan": "pro"}, message_id=identify_id)
analytics.flush()
analytics.shutdown()
if failures:
    raise SystemExit(f"{sdk} python SDK reported: {failures}")
print(json.dumps({"sdk": f"{sdk}-python", "message_ids": ids + [identify_id]}))
