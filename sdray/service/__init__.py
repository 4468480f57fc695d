"""The sdray service: a REST job API over a durable job store and a pluggable backend (``sdray serve``)."""
