#!/usr/bin/env bash
# The sentiment demo end to end: local broker + fake LLM, publish 300 reviews, enrich them,
# show the result, then stop everything this script started.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
bin="$root/.venv/bin"
kafka="$root/deploy/kafka/kafka.sh"
run_id="$(date +%s)"
llm_port="${DEMO_LLM_PORT:-18080}"
export LLM_BASE_URL="http://127.0.0.1:$llm_port/v1"
export DEMO_INPUT_TOPIC="reviews-$run_id" DEMO_OUTPUT_TOPIC="reviews-$run_id.enriched"
export DEMO_DLQ_TOPIC="reviews-$run_id.dlq" DEMO_GROUP="sentiment-demo-$run_id"
rows="$(wc -l < "$here/reviews.jsonl")"
work="$(mktemp -d)"
started_kafka=0
llm_pid="" consumer_pid=""

cleanup() {
    [[ -n "$consumer_pid" ]] && kill -TERM "$consumer_pid" 2>/dev/null && wait "$consumer_pid" 2>/dev/null
    [[ -n "$llm_pid" ]] && kill -TERM "$llm_pid" 2>/dev/null && wait "$llm_pid" 2>/dev/null
    [[ "$started_kafka" == 1 ]] && bash "$kafka" stop >/dev/null
    rm -rf "$work"
}
trap cleanup EXIT

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "Kafka broker (Apache Kafka from Maven jars, KRaft, 127.0.0.1)"
if bootstrap="$(bash "$kafka" status 2>/dev/null)"; then
    echo "reusing the broker at $bootstrap"
else
    bootstrap="$(bash "$kafka" start)"
    started_kafka=1
    echo "started at $bootstrap"
fi
export KAFKA_BOOTSTRAP_SERVERS="$bootstrap"

step "Fake LLM (OpenAI-compatible, 50 ms latency, hidden capacity 32)"
"$bin/llm-consumer" fake-llm --port "$llm_port" --latency-ms 50 --jitter-ms 20 \
    --capacity 32 > "$work/fake-llm.log" 2>&1 &
llm_pid=$!
for _ in $(seq 50); do grep -q listening "$work/fake-llm.log" && break; sleep 0.2; done
head -1 "$work/fake-llm.log"

step "Publish $rows reviews to $DEMO_INPUT_TOPIC (3 partitions, keyed by review_id)"
"$bin/llm-consumer" publish "$here/reviews.jsonl" -t "$DEMO_INPUT_TOPIC" -b "$bootstrap" \
    -k review_id -p 3

step "Run the consumer until every review is enriched"
"$bin/llm-consumer" run -c "$here/settings.yaml" > "$work/consumer.log" 2>&1 &
consumer_pid=$!
if ! "$bin/llm-consumer" tail -t "$DEMO_OUTPUT_TOPIC" -b "$bootstrap" --expect "$rows" \
    --timeout 180 --format jsonl > "$work/out.jsonl"; then
    echo "the consumer did not finish in time; its log:" >&2
    tail -n 30 "$work/consumer.log" >&2
    exit 1
fi
kill -TERM "$consumer_pid" && wait "$consumer_pid" && consumer_pid=""
grep -c '"window done"' "$work/consumer.log" | xargs printf '%s windows processed\n'

step "Enriched output (first 15 of $rows)"
"$bin/llm-consumer" tail -t "$DEMO_OUTPUT_TOPIC" -b "$bootstrap" -n 15 \
    --response-field sentiment 2>/dev/null

step "One enriched message in full"
head -1 "$work/out.jsonl" | "$bin/python" -m json.tool

step "Summary"
"$bin/python" - "$work/out.jsonl" <<'PY'
import collections, json, sys
rows = [json.loads(line)["value"] for line in open(sys.argv[1])]
counts = collections.Counter(r["sentiment"] or f"error:{r['sentiment_error']['reason']}" for r in rows)
tokens = sum((r["sentiment_usage"] or {}).get("total_tokens", 0) for r in rows)
print(f"{len(rows)} rows enriched: " + ", ".join(f"{k} {v}" for k, v in counts.most_common()))
cost = sum(r.get("sentiment_cost_usd") or 0.0 for r in rows)
print(f"{tokens} tokens used, {cost:.6f} USD at the example's prices ({1000 * cost / len(rows):.6f} per 1,000 rows)")
PY
