"""Serving many adapters on one base model: the adapter bank, the continuous-batching engine, the HTTP server
(``lorakit serve``: :func:`lorakit.serve.server.serve_main`) and exports for vLLM / llama.cpp
(``lorakit export``: :func:`lorakit.serve.export.export_main`). See docs/serving.md."""
from .bank import AdapterBank, ServedAdapter, install, read_served, set_ids
from .engine import Engine, SamplingParams

__all__ = ["AdapterBank", "ServedAdapter", "install", "read_served", "set_ids", "Engine", "SamplingParams"]
