"""Sends one agent run to opsagent-audit with the official OpenTelemetry Python SDK.

An `invoke_agent` root span with a chat span and three `execute_tool` spans, in the
OpenTelemetry GenAI conventions, exported over OTLP/HTTP (protobuf, gzip) to a running
`opsagent-audit serve`. Prints the trace id; the stored record's id is the same 32 hex
digits as a UUID.

How to run:

    cargo run -- serve                       # listens on 127.0.0.1:8427
    python3 -m venv /tmp/otel && /tmp/otel/bin/pip install \
        opentelemetry-sdk opentelemetry-exporter-otlp-proto-http
    /tmp/otel/bin/python examples/otlp_python.py [http://127.0.0.1:8427]
    # after the quiet period (audit.otlp.quiet_period, 2 s):
    cargo run -- show <the printed interaction id>

With API tokens configured, set OTEL_EXPORTER_OTLP_HEADERS="Authorization=Bearer <ingest token>".
"""

import json
import sys
import time
import uuid

from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.http import Compression
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import Status, StatusCode

endpoint = (sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:8427").rstrip("/")
provider = TracerProvider(
    resource=Resource.create({"service.name": "ops-agent", "k8s.cluster.name": "prod-eu-1"})
)
provider.add_span_processor(
    BatchSpanProcessor(OTLPSpanExporter(endpoint=f"{endpoint}/v1/traces", compression=Compression.Gzip))
)
tracer = trace.get_tracer("opsagent-example", tracer_provider=provider)

question = "why is web-1 crashlooping?"
with tracer.start_as_current_span("invoke_agent ops-agent") as root:
    root.set_attribute("gen_ai.operation.name", "invoke_agent")
    root.set_attribute("gen_ai.agent.name", "ops-agent")
    root.set_attribute("gen_ai.conversation.id", f"example-{uuid.uuid4()}")
    root.set_attribute("user.id", "alice")
    root.set_attribute(
        "gen_ai.input.messages",
        json.dumps([{"role": "user", "parts": [{"type": "text", "content": question}]}]),
    )
    with tracer.start_as_current_span("chat gpt-4o") as chat:
        chat.set_attribute("gen_ai.operation.name", "chat")
        chat.set_attribute("gen_ai.provider.name", "openai")
        chat.set_attribute("gen_ai.request.model", "gpt-4o")
        chat.set_attribute("gen_ai.usage.input_tokens", 1200)
        chat.set_attribute("gen_ai.usage.output_tokens", 300)
        chat.set_attribute("server.address", "api.openai.com")
        chat.set_attribute(
            "gen_ai.output.messages",
            json.dumps([{"role": "assistant", "parts": [
                {"type": "reasoning", "content": "look at the pod's events and last state first"},
                {"type": "text", "content": "checking the pod"},
            ]}]),
        )
        time.sleep(0.05)
    for name, args, result in [
        ("kubectl", "get pods -n web", "web-1 0/1 CrashLoopBackOff"),
        ("kubectl", "describe pod web-1 -n web", "Last State: Terminated, Reason: OOMKilled"),
        ("shell", "dmesg | tail -n 5", None),
    ]:
        with tracer.start_as_current_span(f"execute_tool {name}") as tool:
            tool.set_attribute("gen_ai.operation.name", "execute_tool")
            tool.set_attribute("gen_ai.tool.name", name)
            tool.set_attribute("gen_ai.tool.call.arguments", args)
            if result is None:
                tool.set_status(Status(StatusCode.ERROR, "permission denied"))
            else:
                tool.set_attribute("gen_ai.tool.call.result", result)
            time.sleep(0.02)
    root.set_attribute(
        "gen_ai.output.messages",
        json.dumps([{"role": "assistant", "parts": [
            {"type": "text", "content": "web-1 is OOMKilled: raise its memory limit"},
        ]}]),
    )
    trace_id = root.get_span_context().trace_id

provider.shutdown()  # flushes the batch processor
print(f"trace id {trace_id:032x}; interaction id {uuid.UUID(int=trace_id)}")
