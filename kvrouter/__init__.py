"""kvrouter: a KV-cache-aware request router for fleets of LLM inference engines."""
