"""llm-consumer: enrich JSON rows on a Kafka topic with LLM calls, in windows, under AIMD."""

__version__ = "0.1.0"
